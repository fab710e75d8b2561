{#- The template of an NFS server qube: qubes.ConnectNFS (package
    qrexec-connect-nfs). qubes.ConnectTCP needs nothing: it is part of
    Qubes. Apply: qubesctl --skip-dom0 --targets=TEMPLATE state.apply
    qrexec-connect.service. -#}
{%- from "qrexec-connect/package.jinja" import package_state with context %}
{{ package_state('qrexec-connect-nfs-package', 'qrexec-connect-nfs') }}
