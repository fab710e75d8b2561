{#- dom0: the qrexec policy that allows exactly the pillar's bindings, in
    the R4.1+ format (rules as docs/policy-lines.md describes them). Apply:
    qubesctl state.apply qrexec-connect.policy. -#}
{%- from "qrexec-connect/bindings.jinja" import qrexec_connect with context %}
{%- set path = '/etc/qubes/policy.d/30-qrexec-connect-salt.policy' %}

{%- if qrexec_connect.errors %}
qrexec-connect-pillar:
  test.fail_without_changes:
    - comment: {{ qrexec_connect.errors | join('\n') | tojson }}

{%- elif qrexec_connect.policy_lines %}
qrexec-connect-policy:
  file.managed:
    - name: {{ path | tojson }}
    - user: root
    - group: qubes
    - mode: '0664'
    - contents: {{ ('# Written by Salt (qrexec-connect formula) from the pillar qrexec-connect:bindings;\n# edits here are overwritten. Each client qube has the matching lines in\n# ~/.config/qrexec-connect/salt.conf.\n' ~ qrexec_connect.policy_lines | join('\n') ~ '\n') | tojson }}

{%- else %}
qrexec-connect-policy:
  file.absent:
    - name: {{ path | tojson }}
{%- endif %}
