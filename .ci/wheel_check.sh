#!/usr/bin/env bash
# The package as users install it: build the sdist and wheel (the wheel from the sdist, as a release
# would), check both hold every file of src/clipforge, install the wheel with the serve extra into a
# clean virtualenv outside the repository, and smoke-test it from a folder where src/ is not importable:
# every module imports, --help of every command, a tiny index + search, the HTTP service and its page.
# Run by `make wheel-check` (CI's .ci/run). Environment: PY (the Python that builds; default
# .venv/bin/python), TORCH_SPEC (default torch==2.13.0), KEEP_WHEEL_CHECK=1 keeps the scratch folder.
set -Eeuo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/clipforge-wheel-check.XXXXXX")"
DIST="$WORK/dist" VENV="$WORK/venv" RUN="$WORK/cwd"
STEP="setup"
SERVER_PID=""
START=$SECONDS

step() { STEP="$1"; echo "== wheel-check [$((SECONDS - START))s]: $STEP"; }
fail() { echo "wheel-check: FAILED in step '$STEP': $*" >&2; exit 1; }
on_error() { echo "wheel-check: FAILED in step '$STEP' (exit $1 from: ${2%%$'\n'*})" >&2; }
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    if [ "${KEEP_WHEEL_CHECK:-}" = 1 ]; then echo "wheel-check: scratch folder kept: $WORK"; else rm -rf "$WORK"; fi
}
trap 'on_error $? "$BASH_COMMAND"' ERR
trap cleanup EXIT
trap 'exit 130' INT TERM
# A log shown only when its command fails.
quiet() { local log="$WORK/$1.log"; shift; "$@" >"$log" 2>&1 || { tail -n 40 "$log" >&2; fail "'$*' failed (log above)"; }; }

step "build the sdist and wheel"
[ -x "$PY" ] || fail "no Python at $PY: run 'make install' first, or set PY"
if ! "$PY" -m build --version >/dev/null 2>&1; then
    quiet pip-build "$PY" -m pip install -q build
fi
# The virtualenv's own setuptools when it is recent enough (offline, fast); otherwise an isolated build
# environment fetches pyproject's build requirements from the package index.
ISOLATION=()
if "$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null; then
    ISOLATION=(--no-isolation)
fi
quiet build "$PY" -m build "${ISOLATION[@]}" --outdir "$DIST" "$REPO"
WHEEL="$(ls "$DIST"/clipforge-*.whl)" SDIST="$(ls "$DIST"/clipforge-*.tar.gz)"
echo "   $(basename "$SDIST"), $(basename "$WHEEL")"

step "check the files in the sdist and wheel"
"$PY" - "$REPO" "$WHEEL" "$SDIST" <<'EOF'
import subprocess, sys, tarfile, zipfile
from pathlib import Path

repo, wheel, sdist = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
# The package's files: what git tracks or would track under src/clipforge (a plain walk without git).
try:
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "--cached", "--others", "--exclude-standard",
                             "src/clipforge"], check=True, capture_output=True, text=True).stdout.split("\n")
except (OSError, subprocess.CalledProcessError):
    listed = [str(p.relative_to(repo)) for p in (repo / "src/clipforge").rglob("*") if p.is_file()]
source = {p[len("src/"):] for p in listed if p and (repo / p).is_file()
          and "__pycache__" not in p and not p.endswith((".pyc", ".pyo"))}
kinds = {"modules (.py)": lambda p: p.endswith(".py"), "model configs": lambda p: "/model_configs/" in p,
         "assets": lambda p: "/assets/" in p, "page files": lambda p: "/serve/static/" in p}
errors = [f"src/ has no {kind}" for kind, match in kinds.items() if not any(map(match, source))]

in_wheel = set(zipfile.ZipFile(wheel).namelist())
missing = sorted(source - in_wheel)
errors += [f"the wheel lacks {len(missing)} package file(s) (a data file pyproject's "
           f"[tool.setuptools.package-data] does not name, or a folder packages.find leaves out): " + ", ".join(missing[:20])] if missing else []
stray = sorted(p for p in in_wheel if p.startswith("clipforge/") and p not in source)
errors += [f"the wheel has file(s) the source tree does not (stale build/ folder?): {', '.join(stray[:20])}"] if stray else []
tops = sorted({p.split("/")[0] for p in in_wheel} - {"clipforge"})
if len(tops) != 1 or not tops[0].endswith(".dist-info"):
    errors.append(f"the wheel installs more than the clipforge package: {tops}")
entry_points = next((p for p in in_wheel if p.endswith(".dist-info/entry_points.txt")), None)
if not entry_points or "clipforge = clipforge.cli:main" not in zipfile.ZipFile(wheel).read(entry_points).decode():
    errors.append("the wheel declares no 'clipforge' console script")

with tarfile.open(sdist) as tar:
    names = tar.getnames()
root = names[0].split("/")[0]
in_sdist = {n[len(root) + 1:] for n in names}
need = {"src/" + p for p in source} | {"README.md", "pyproject.toml"}
need |= {p.name for p in repo.glob("LICEN[CS]E*")} | {p.name for p in repo.glob("NOTICE*")}
missing = sorted(need - in_sdist)
errors += [f"the sdist lacks {len(missing)} file(s): " + ", ".join(missing[:20])] if missing else []
for error in errors:
    print("   " + error, file=sys.stderr)
if errors:
    sys.exit(1)
print(f"   {len(source)} package files, all in the wheel and the sdist")
EOF

step "install the wheel into a clean virtualenv ($TORCH_SPEC, then clipforge[serve])"
quiet venv "$PY" -m venv "$VENV"
quiet pip-torch "$VENV/bin/python" -m pip install -q --no-compile "$TORCH_SPEC"
quiet pip-wheel "$VENV/bin/python" -m pip install -q "$WHEEL[serve]"

# From here on: the installed package only, from a folder outside the repository.
mkdir -p "$RUN" && cd "$RUN"
unset PYTHONPATH PYTHONHOME
export PATH="$VENV/bin:$PATH" PYTHONNOUSERSITE=1
CLI="$VENV/bin/clipforge"
[ -x "$CLI" ] || fail "the wheel installed no clipforge command at $CLI"

step "import clipforge from the virtualenv's site-packages, then every module"
"$VENV/bin/python" - <<'EOF'
import importlib, importlib.metadata as md, importlib.util, pkgutil, re, sys, sysconfig, traceback
import clipforge

site = sysconfig.get_paths()["purelib"]
if not clipforge.__file__.startswith(site):
    sys.exit(f"   clipforge was imported from {clipforge.__file__}, not from the virtualenv's {site}")
print(f"   clipforge from {clipforge.__file__}")
# A module may need an extra that is not installed here (only [serve] is): that is skipped. Anything
# else failing is a packaging bug: a file missing from the wheel, a dependency pyproject does not
# declare, an import that works only from the source tree.
renamed = {"faiss-cpu": "faiss", "pillow": "PIL", "python-multipart": "multipart", "tensorboard": "tensorboard"}
optional = set()
for requirement in md.requires("clipforge") or []:
    if "extra ==" in requirement:
        dist = re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-")
        optional.add(renamed.get(dist, dist.replace("-", "_")))
optional.add("torchvision")  # timm's own dependency (the timm extra)
failed, skipped, count = [], [], 0
for info in pkgutil.walk_packages(clipforge.__path__, "clipforge."):
    if info.name.endswith(".__main__"):  # runs the command line; the --help step below covers it
        continue
    count += 1
    try:
        importlib.import_module(info.name)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top in optional and importlib.util.find_spec(top) is None:
            skipped.append(f"{info.name} (needs {top})")
        else:
            failed.append(f"{info.name}: {traceback.format_exc(limit=-1).strip().splitlines()[-1]}")
    except (Exception, SystemExit):
        failed.append(f"{info.name}: {traceback.format_exc(limit=-1).strip().splitlines()[-1]}")
print(f"   {count - len(failed) - len(skipped)} of {count} modules imported"
      + (f"; skipped for extras not installed: {', '.join(skipped)}" if skipped else ""))
for line in failed:
    print("   " + line, file=sys.stderr)
sys.exit(1 if failed else 0)
EOF

step "--help of every command"
# The commands, read from the CLI's own parser (nested subcommands too), so a new one is covered as added.
mapfile -t COMMANDS < <("$VENV/bin/python" - <<'EOF'
import argparse
from clipforge.cli import build_parser

def walk(parser, path):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                print(" ".join(path + [name]))
                walk(sub, path + [name])

walk(build_parser(), [])
EOF
)
[ "${#COMMANDS[@]}" -gt 0 ] || fail "found no subcommands in clipforge.cli.build_parser()"
help_ok() {  # exit 0, a usage line on stdout (kept in $WORK/help.out), nothing on stderr
    "$@" >"$WORK/help.out" 2>"$WORK/help.err" || { cat "$WORK/help.err" >&2; fail "'$*' exited non-zero"; }
    [ "$(head -c 6 "$WORK/help.out")" = "usage:" ] || fail "'$*' printed no usage line"
    [ ! -s "$WORK/help.err" ] || { cat "$WORK/help.err" >&2; fail "'$*' wrote to stderr"; }
}
help_ok "$VENV/bin/python" -m clipforge --help
MAIN_HELP="$(cat "$WORK/help.out")"
help_ok "$CLI" --help
TOP="$(cat "$WORK/help.out")"
[ "$MAIN_HELP" = "$TOP" ] || fail "python -m clipforge --help differs from clipforge --help"
for cmd in "${COMMANDS[@]}"; do
    [[ "$cmd" == *" "* ]] || grep -qE "^ +$cmd( |$)" <<<"$TOP" || fail "clipforge --help does not list '$cmd'"
    # shellcheck disable=SC2086 # a nested command is several words
    help_ok "$CLI" $cmd --help
done
echo "   clipforge, python -m clipforge and ${#COMMANDS[@]} commands: ${COMMANDS[*]}"

step "a tiny index and search (--model tiny-vit --random-init)"
"$VENV/bin/python" - "$WORK/images" <<'EOF'
import sys
from pathlib import Path
from PIL import Image, ImageDraw

folder = Path(sys.argv[1])
folder.mkdir()
for i, color in enumerate(["red", "green", "blue", "yellow", "white", "black"]):
    image = Image.new("RGB", (64 + 16 * i, 48 + 8 * i), color)
    ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill="gray")
    image.save(folder / f"{i}-{color}.{'png' if i % 2 else 'jpg'}")
EOF
"$CLI" index "$WORK/images" --index "$WORK/index" --model tiny-vit --random-init --workers 0 --no-progress --device cpu --json \
    >"$WORK/index.json" 2>"$WORK/index.err" || { cat "$WORK/index.err" >&2; fail "clipforge index exited non-zero"; }
"$CLI" search "$WORK/index" "a red circle" + "$WORK/images/1-green.png" --top 3 --json --device cpu >"$WORK/search.json" \
    || fail "clipforge search exited non-zero"
"$VENV/bin/python" - "$WORK/index.json" "$WORK/search.json" <<'EOF'
import json, sys

summary = json.load(open(sys.argv[1]))
results = json.load(open(sys.argv[2]))
if not isinstance(results, list) or len(results) != 3 or not all("path" in r and "score" in r for r in results):
    sys.exit(f"   clipforge search --json --top 3 gave {results!r}, not three results with path and score")
print(f"   index: {json.dumps(summary, separators=(',', ':'))[:200]}")
print(f"   search: {[r['path'].rsplit('/', 1)[-1] for r in results]}")
EOF

step "serve the index; /healthz, the page and its files, a search over HTTP"
PORT="$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$CLI" serve "$WORK/index" --host 127.0.0.1 --port "$PORT" --device cpu >"$WORK/serve.log" 2>&1 &
SERVER_PID=$!
"$VENV/bin/python" - "http://127.0.0.1:$PORT" "$SERVER_PID" "$WORK/serve.log" <<'EOF'
import json, re, sys, time, urllib.error, urllib.request

base, pid, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def get(path, body=None):  # the body of a 200 answer; exits on any other (a refused connection raises)
    request = urllib.request.Request(base + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            data = response.read()
    except urllib.error.HTTPError as e:
        sys.exit(f"   {'POST' if body else 'GET'} {path}: HTTP {e.code}: {e.read()[:500]!r}")
    if response.status != 200 or not data:
        sys.exit(f"   {'POST' if body else 'GET'} {path}: HTTP {response.status}, {len(data)} bytes")
    return data

def alive():  # a child of the shell, not of this process: read its state (Z: exited, not yet reaped)
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return True

deadline = time.monotonic() + 90
while True:
    try:
        health = json.loads(get("/healthz"))
        break
    except OSError:
        if time.monotonic() > deadline or not alive():
            sys.exit(f"   the service did not answer /healthz (gone or 90 s passed); its log:\n{open(log).read()}")
        time.sleep(0.5)
if health.get("status") != "ok" or health.get("items") != 6:
    sys.exit(f"   /healthz said {health}, not ok with 6 items")
page = get("/").decode()
files = re.findall(r'(?:src|href)="(/static/[^"]+)"', page)
if not files:
    sys.exit("   the page at / names no /static/ files")
sizes = {path: len(get(path)) for path in files}
found = json.loads(get("/api/search", json.dumps({"query": "a red circle", "top_k": 2}).encode()))["results"]
if len(found) != 2:
    sys.exit(f"   POST /api/search gave {found}, not two results")
print(f"   /healthz {health}; / {len(page)} bytes; {sizes}; /api/search {len(found)} results")
EOF
kill "$SERVER_PID" && wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=""

STEP="done"
echo "== wheel-check [$((SECONDS - START))s]: passed: $(basename "$WHEEL") installs and its CLI, service and page work"
