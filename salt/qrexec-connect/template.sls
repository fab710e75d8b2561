{#- A template of client qubes: the qrexec-connect package. Its qubes then
    run the bindings in their salt.conf (client.sls) at login and at every
    `systemctl --user daemon-reload`. Apply: qubesctl --skip-dom0
    --targets=TEMPLATE state.apply qrexec-connect.template. -#}
{%- from "qrexec-connect/package.jinja" import package_state with context %}
{{ package_state('qrexec-connect-package', 'qrexec-connect') }}
