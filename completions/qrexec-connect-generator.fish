# fish completion for qrexec-connect-generator

complete -c qrexec-connect-generator -l check -d 'print every error and warning, then a summary'
complete -c qrexec-connect-generator -s v -l verbose -n '__fish_seen_argument -l check' -d 'with --check: also the files read and the units'
complete -c qrexec-connect-generator -s h -l help -d 'show the help'
complete -c qrexec-connect-generator -s V -l version -d 'show the version'
# --check FILE...: config files; otherwise the output directory.
complete -c qrexec-connect-generator -n '__fish_seen_argument -l check' -F
complete -c qrexec-connect-generator -n 'not __fish_seen_argument -l check' -a '(__fish_complete_directories)'
