{#- A client qube: its bindings from the pillar, in
    ~USER/.config/qrexec-connect/salt.conf (home persists in an app qube).
    The qube is the minion id, which qubesctl sets to the qube's name. No
    bindings for this qube: no file. Apply: qubesctl --skip-dom0
    --targets=CLIENTS state.apply qrexec-connect.client. -#}
{%- from "qrexec-connect/bindings.jinja" import qrexec_connect with context %}
{%- set qube = grains['id'] %}
{%- set lines = qrexec_connect.config_lines.get(qube, []) %}
{%- set account = {} if qrexec_connect.user_error else salt['user.info'](qrexec_connect.user) %}

{%- if qrexec_connect.errors or qrexec_connect.user_error %}
qrexec-connect-pillar:
  test.fail_without_changes:
    - comment: {{ (qrexec_connect.errors + ([qrexec_connect.user_error] if qrexec_connect.user_error else [])) | join('\n') | tojson }}

{%- elif not account %}
qrexec-connect-pillar:
  test.fail_without_changes:
    - comment: {{ ('qrexec-connect:user: no user ' ~ qrexec_connect.user ~ ' in ' ~ qube) | tojson }}

{%- else %}
{%- set group = salt['file.gid_to_group'](account.gid) %}
{%- set config_dir = account.home ~ '/.config' %}
{%- set path = config_dir ~ '/qrexec-connect/salt.conf' %}
{%- if lines %}
{#- Checked as the daemon will read it: by the generator of the installed
    package, on a copy in a directory of its own (so that other config files
    do not fail this state), with the user's home and runtime dir for %h and
    %t. Only problems in this file fail the state; warnings pass. Without
    the package (not installed in the template yet) the pillar checks above
    are all there is. #}
{%- set check_script = 'command -v qrexec-connect-generator >/dev/null || exit 0
dir=$(mktemp -d) || exit 1
mkdir "$dir/qrexec-connect" && cp "$1" "$dir/qrexec-connect/salt.conf" || exit 1
out=$(HOME=' ~ account.home ~ ' XDG_RUNTIME_DIR=/run/user/' ~ account.uid ~ ' XDG_CONFIG_HOME="$dir" qrexec-connect-generator --check 2>&1 >/dev/null)
rm -rf "$dir"
problems=$(printf "%s\\n" "$out" | sed -n "s|^$dir/qrexec-connect/salt.conf:|' ~ path ~ ':|p" | grep -v "^[^ ]*:[0-9]*: warning: ")
[ -z "$problems" ] || { printf "%s\\n" "$problems"; exit 1; }' %}

qrexec-connect-config-dir:
  file.directory:
    - name: {{ (config_dir ~ '/qrexec-connect') | tojson }}
    - user: {{ account.name | tojson }}
    - group: {{ group | tojson }}
    - mode: '0755'
    - makedirs: True

qrexec-connect-client-config:
  file.managed:
    - name: {{ path | tojson }}
    - user: {{ account.name | tojson }}
    - group: {{ group | tojson }}
    - mode: '0644'
{#- ensure_ascii=False: a LISTEN path may hold any printable character,
    and JSON's \uD83D\uDE00 pairs for those beyond U+FFFF are not YAML. #}
    - contents: {{ ('# Written by Salt (qrexec-connect formula) for ' ~ qube ~ ' from the pillar\n# qrexec-connect:bindings; edits here are overwritten. LISTEN TARGET SERVICE.\n' ~ lines | join('\n') ~ '\n') | tojson(ensure_ascii=False) }}
    - check_cmd: {{ ("sh -c '" ~ check_script ~ "' qrexec-connect-check") | tojson }}
    - require:
      - file: qrexec-connect-config-dir

{%- else %}

qrexec-connect-client-config:
  file.absent:
    - name: {{ path | tojson }}
{%- endif %}
{%- endif %}
