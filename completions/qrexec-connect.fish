# fish completion for qrexec-connect: the users' commands first, then the
# ones systemd runs, and each command's own options. The daemon's options
# are not offered: systemd starts the daemon, not a user.
# With -k fish keeps the order, showing what is defined last first, so the
# commands are defined from the last to the first.

set -l commands add remove status policy help reconcile recover
set -l top "not __fish_seen_subcommand_from $commands"
complete -c qrexec-connect -f
complete -c qrexec-connect -n $top -k -a recover -d 'run by systemd: bring failed bindings back'
complete -c qrexec-connect -n $top -k -a reconcile -d 'run by systemd: apply changed socket units'
complete -c qrexec-connect -n $top -k -a help -d "show the help, or a command's"
complete -c qrexec-connect -n $top -k -a policy -d "print the dom0 policy for this qube's bindings"
complete -c qrexec-connect -n $top -k -a status -d 'show each binding; exit 0 only when all are well'
complete -c qrexec-connect -n $top -k -a remove -d 'remove the binding of LISTEN'
complete -c qrexec-connect -n $top -k -a add -d "bind LISTEN to a qube's service for good"
complete -c qrexec-connect -n $top -s V -l version -d 'show the version'
complete -c qrexec-connect -s h -l help -d 'show the help'
complete -c qrexec-connect -n '__fish_seen_subcommand_from add' -l file -x -d 'the file in ~/.config/qrexec-connect'
complete -c qrexec-connect -n '__fish_seen_subcommand_from add' -l tcp -x -d "qvm-connect-tcp's LOCALPORT:TARGET:PORT"
complete -c qrexec-connect -n '__fish_seen_subcommand_from status' -l json -d 'print a JSON array'
complete -c qrexec-connect -n '__fish_seen_subcommand_from policy' -l source -x -d "this qube's name"
complete -c qrexec-connect -n '__fish_seen_subcommand_from reconcile' -l runtime-dir -x -a '(__fish_complete_directories)' -d 'the runtime directory'
complete -c qrexec-connect -n '__fish_seen_subcommand_from help' -a "$commands" -d 'a command'
