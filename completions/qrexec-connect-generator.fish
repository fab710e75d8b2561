# fish completion for qrexec-connect-generator

complete -c qrexec-connect-generator -l check -d 'print the units and every problem'
complete -c qrexec-connect-generator -s h -l help -d 'show the help'
complete -c qrexec-connect-generator -s V -l version -d 'show the version'
complete -c qrexec-connect-generator -a '(__fish_complete_directories)'
