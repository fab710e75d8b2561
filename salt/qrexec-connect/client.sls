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
{%- set own_dir = config_dir ~ '/qrexec-connect' %}
{%- set path = own_dir ~ '/salt.conf' %}
{#- The states run as root in a home the user owns: a link there would
    carry root's write, and the chown to the user that follows, to any file
    (ln -s /etc/passwd salt.conf). So no link is followed (follow_symlinks,
    allow_symlink below), and a link or a directory of another owner on the
    way fails the state, naming the path, before anything is written. Salt
    3006's file states cannot write as the user (no runas), so a swap between
    this check and the write remains possible: see docs/design.md. #}
{%- set unsafe = [] %}
{%- for each in [config_dir, own_dir, path] if salt['file.is_link'](each) %}
  {%- do unsafe.append(each ~ ' is a symbolic link: this state runs as root and writes through none (remove it)') %}
{%- endfor %}
{%- if not unsafe and salt['file.directory_exists'](own_dir) and salt['file.get_uid'](own_dir, follow_symlinks=False) != account.uid %}
  {%- do unsafe.append(own_dir ~ ' is not owned by user ' ~ account.name ~ ' (it is uid ' ~ salt['file.get_uid'](own_dir, follow_symlinks=False) ~ ')') %}
{%- endif %}
{%- if unsafe %}

qrexec-connect-client-config:
  test.fail_without_changes:
    - comment: {{ unsafe | join('\n') | tojson }}

{%- elif lines %}
{#- Checked as the daemon will read it: by the generator of the installed
    package, as the user (its ownership checks take the user's own
    /run/user/UID and home for the user's, not another's), with the user's
    home and runtime dir for %h and %t. Only this file is checked
    (--check FILE), so that the other config files, the qube's
    /etc/qrexec-connect among them, neither fail this state nor show up in
    its message. The generator reads a copy, in a directory of its own that
    the user can read but not change (Salt's temporary file is root's
    alone). Its exit status decides, as for a user's --check: an error (a
    bad line, named with its text on the indented line after it) fails the
    state; warnings alone pass, and are left out of the message. Without
    the package (not installed in the template yet) the pillar checks above
    are all there is. #}
{%- set check_script = 'command -v qrexec-connect-generator >/dev/null || exit 0
command -v setpriv >/dev/null || { echo "setpriv (util-linux) is needed to check salt.conf as ' ~ account.name ~ '"; exit 1; }
dir=$(mktemp -d) || exit 1
cp "$1" "$dir/salt.conf" && chmod -R a+rX "$dir" || exit 1
out=$(HOME=' ~ account.home ~ ' XDG_RUNTIME_DIR=/run/user/' ~ account.uid ~ ' setpriv --reuid=' ~ account.uid ~ ' --regid=' ~ account.gid ~ ' --init-groups qrexec-connect-generator --check "$dir/salt.conf" 2>&1 >/dev/null)
status=$?
rm -rf "$dir"
[ "$status" = 0 ] && exit 0
printf "%s\\n" "$out" | sed -e "s|^$dir/salt.conf:|' ~ path ~ ':|" -e "/^[^ ]*:[0-9]*: warning: /{N;d;}"
exit 1' %}

qrexec-connect-config-dir:
  file.directory:
    - name: {{ (config_dir ~ '/qrexec-connect') | tojson }}
    - user: {{ account.name | tojson }}
    - group: {{ group | tojson }}
    - mode: '0755'
    - makedirs: True
    - allow_symlink: False

qrexec-connect-client-config:
  file.managed:
    - name: {{ path | tojson }}
    - user: {{ account.name | tojson }}
    - group: {{ group | tojson }}
    - mode: '0644'
    - follow_symlinks: False
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
