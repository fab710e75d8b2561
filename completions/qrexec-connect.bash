# bash completion for qrexec-connect and qrexec-connect-generator

# qrexec-connect: the users' commands first (the ones systemd runs only once
# typed), then each command's own options. The daemon's options are not
# offered: systemd starts the daemon, not a user.
_qrexec_connect() {
    local cur=${COMP_WORDS[COMP_CWORD]}
    local prev=${COMP_WORDS[COMP_CWORD-1]}
    local user_commands='add remove status policy help'
    local systemd_commands='reconcile recover'
    # The command is the first word that is no option (-d may come first).
    local i at=0 command=
    for ((i = 1; i < COMP_CWORD; i++)); do
        if [[ ${COMP_WORDS[i]} != -* ]]; then
            at=$i command=${COMP_WORDS[i]}
            break
        fi
    done
    local words
    case $command in
    '')
        if [[ $cur == -* ]]; then
            words='--help --version'
        elif [[ -z $cur ]]; then
            words=$user_commands
        else
            words="$user_commands $systemd_commands"
        fi
        ;;
    add)
        case $prev in
        --file)
            # The config files that exist, without their .conf.
            local dir=${XDG_CONFIG_HOME:-$HOME/.config}/qrexec-connect f names=
            for f in "$dir"/*.conf; do
                [[ -e $f ]] && names+=" $(basename "$f" .conf)"
            done
            mapfile -t COMPREPLY < <(compgen -W "$names" -- "$cur")
            return
            ;;
        --tcp) return ;;
        esac
        words='--file --tcp --help'
        ;;
    remove)
        [[ $cur == -* ]] || return
        words='--help'
        ;;
    status) words='--json --help' ;;
    policy)
        [[ $prev == --source ]] && return
        words='--source --help'
        ;;
    help)
        if [[ $cur == -* ]]; then
            words='--help'
        elif ((COMP_CWORD == at + 1)); then
            words="$user_commands $systemd_commands"
        else
            return
        fi
        ;;
    reconcile)
        if [[ $cur == --runtime-dir=* ]]; then
            mapfile -t COMPREPLY < <(compgen -d -- "${cur#*=}")
            return
        fi
        words='--runtime-dir= --help'
        ;;
    recover) words='--help' ;;
    *) return ;;
    esac
    mapfile -t COMPREPLY < <(compgen -W "$words" -- "$cur")
    [[ ${COMPREPLY[0]} == *= ]] && compopt -o nospace
}

_qrexec_connect_generator() {
    local cur=${COMP_WORDS[COMP_CWORD]}
    if [[ $COMP_CWORD -eq 1 ]]; then
        mapfile -t COMPREPLY < <(compgen -W '--check -h --help -V --version' -- "$cur")
        [[ $cur == -* ]] || mapfile -t -O "${#COMPREPLY[@]}" COMPREPLY < <(compgen -d -- "$cur")
    elif [[ ${COMP_WORDS[1]} == --check ]]; then
        # --check [--verbose] [FILE...]
        mapfile -t COMPREPLY < <(compgen -W '-v --verbose' -- "$cur")
        [[ $cur == -* ]] || mapfile -t -O "${#COMPREPLY[@]}" COMPREPLY < <(compgen -f -- "$cur")
    fi
}

complete -F _qrexec_connect qrexec-connect
complete -F _qrexec_connect_generator qrexec-connect-generator
