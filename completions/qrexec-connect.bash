# bash completion for qrexec-connect and qrexec-connect-generator

_qrexec_connect() {
    local cur=${COMP_WORDS[COMP_CWORD]}
    local prev=${COMP_WORDS[COMP_CWORD-1]}
    local command=${COMP_WORDS[1]}
    case $command in
    status)
        mapfile -t COMPREPLY < <(compgen -W '--json' -- "$cur")
        return
        ;;
    policy)
        if [[ $prev == --source ]]; then
            return
        fi
        mapfile -t COMPREPLY < <(compgen -W '--source' -- "$cur")
        return
        ;;
    reconcile | recover)
        return
        ;;
    esac
    case $cur in
    --client-mode=*)
        mapfile -t COMPREPLY < <(compgen -W 'auto stdin-socket pipe' -- "${cur#*=}")
        return
        ;;
    --qrexec-client-vm=*)
        mapfile -t COMPREPLY < <(compgen -f -- "${cur#*=}")
        return
        ;;
    esac
    local words='--qrexec-client-vm= --max-connections= --client-mode= -d --debug -h --help -V --version'
    if [[ $COMP_CWORD -eq 1 ]]; then
        words="status policy reconcile recover $words"
    fi
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
