# fish completion for qrexec-connect

set -l commands status policy reconcile recover
complete -c qrexec-connect -f
complete -c qrexec-connect -n "not __fish_seen_subcommand_from $commands" -a status -d 'show each binding; exit 0 only when all are well'
complete -c qrexec-connect -n "not __fish_seen_subcommand_from $commands" -a policy -d "print the dom0 policy for this qube's bindings"
complete -c qrexec-connect -n "not __fish_seen_subcommand_from $commands" -a reconcile -d 'apply changed socket units (run by systemd)'
complete -c qrexec-connect -n "not __fish_seen_subcommand_from $commands" -a recover -d 'bring failed bindings back (run by systemd)'
complete -c qrexec-connect -n '__fish_seen_subcommand_from status' -l json -d 'print a JSON array'
complete -c qrexec-connect -n '__fish_seen_subcommand_from policy' -l source -x -d "this qube's name"
complete -c qrexec-connect -n "not __fish_seen_subcommand_from $commands" -l qrexec-client-vm -r -F -d 'the client to run'
complete -c qrexec-connect -n "not __fish_seen_subcommand_from $commands" -l max-connections -x -d 'live connections per binding'
complete -c qrexec-connect -n "not __fish_seen_subcommand_from $commands" -l client-mode -x -a 'auto stdin-socket pipe' -d 'how the client gets the connection'
complete -c qrexec-connect -n "not __fish_seen_subcommand_from $commands" -s d -l debug -d 'log every connection'
complete -c qrexec-connect -s h -l help -d 'show the help'
complete -c qrexec-connect -s V -l version -d 'show the version'
