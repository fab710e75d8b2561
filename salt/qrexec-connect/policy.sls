{#- dom0: the qrexec policy that allows exactly the pillar's bindings, in
    the R4.1+ format (rules as docs/policy-lines.md describes them). Apply:
    qubesctl state.apply qrexec-connect.policy.

    The file's name is one of the project's fixed names
    (src/bin/qrexec-connect/policy/fixed_files.rs): a '.' after
    30-qrexec-connect, where the file `qrexec-connect policy` suggests for a
    client qube has a '-', so a qube named salt never shares it. Earlier
    versions wrote 30-qrexec-connect-salt.policy: that file is removed when
    Salt wrote it (its first line says so), as its rules may allow bindings
    the pillar no longer has; a qube's own file of that name stays. -#}
{%- from "qrexec-connect/bindings.jinja" import qrexec_connect with context %}
{%- set path = '/etc/qubes/policy.d/30-qrexec-connect.salt.policy' %}
{%- set old_path = '/etc/qubes/policy.d/30-qrexec-connect-salt.policy' %}

{%- if qrexec_connect.errors %}
qrexec-connect-pillar:
  test.fail_without_changes:
    - comment: {{ qrexec_connect.errors | join('\n') | tojson }}

{%- else %}
qrexec-connect-policy-old-name:
  file.absent:
    - name: {{ old_path | tojson }}
    - onlyif: {{ ("head -n 1 -- " ~ old_path ~ " | grep -q '^# Written by Salt (qrexec-connect formula)'") | tojson }}
{%- if qrexec_connect.policy_lines %}

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
{%- endif %}
