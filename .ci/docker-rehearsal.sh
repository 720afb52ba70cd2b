#!/usr/bin/env bash
# Rehearses the Dockerfile's builder stage without a Docker daemon (CI has none), so that
# `docker build .` on a clean checkout is known to work before anyone runs it:
#   1. the build context as Docker sends it: the checkout's tracked files less .dockerignore;
#   2. the builder stage's COPY lines, read from the Dockerfile, copy from it into an empty
#      temporary folder (the folder stands for the image's /, so WORKDIR /src is <tmp>/root/src);
#   3. the stage's RUN lines, read from the Dockerfile too, run there with `sh -c`, as Docker runs
#      them, in an environment as bare as a build's;
#   4. what the runtime stage copies out of the builder stage must then exist, and every source
#      that `cargo build` compiles (library, binaries, build script) must be the checkout's own
#      file, not a stand-in and not missing because no COPY brought it.
# Reading the instructions from the Dockerfile keeps the rehearsal from drifting; an instruction
# or a form it does not know (ADD, COPY --from, wildcards, RUN --mount, exec form, ...) fails it
# rather than being skipped.
#
# What differs from Docker: the toolchain is this machine's, not the rust:*-slim image's; the
# crates come from this machine's cargo registry cache ($CARGO_HOME) instead of being downloaded.
# The target folder is the temporary one, never the checkout's, so the copied files alone must
# suffice.
#
#   bash .ci/docker-rehearsal.sh            # KEEP=1 keeps the temporary folder
set -euo pipefail
cd "$(dirname "$0")/.."
stage=builder
started=$SECONDS

# No override of the release profile (fat LTO, one codegen unit): both builds of the stage took
# about 6 minutes on 2 shared cores, so the rehearsal builds exactly what the image builds.

die() {
  echo "docker rehearsal: $*" >&2
  exit 1
}

# --- 1. The Dockerfile's instructions, one per line, as Docker reads them: comment lines dropped
# (also inside a continued instruction), blank lines inside one skipped, `\`-continued lines joined.
instructions() {
  awk '
    /^[ \t]*#/ { next }
    /^[ \t]*$/ { next }
    {
      line = $0
      if (line ~ /\\[ \t]*$/) { sub(/\\[ \t]*$/, "", line); held = held line; next }
      print held line
      held = ""
    }
    END { if (held != "") print held }
  ' Dockerfile
}

# The instructions of one stage: from its `FROM ... AS <name>` to the next FROM.
stage_of() {
  instructions | awk -v name="$1" '
    toupper($1) == "FROM" { inside = (NF >= 4 && toupper($(NF - 1)) == "AS" && $NF == name); next }
    inside
  '
}

# --- 2. The build context: tracked files (a clean checkout has no others), less .dockerignore.
# .dockerignore patterns as Docker applies them: anchored at the context's root, `*` and `?`
# within one path segment, `**` across segments, `!` re-includes, the last matching line wins,
# and a pattern that matches a folder excludes everything under it.
context_files() {
  git ls-files -z | tr '\0' '\n' | while IFS= read -r f; do if [ -f "$f" ]; then printf '%s\n' "$f"; fi; done \
    | if [ -f .dockerignore ]; then
      awk '
        function clean(p) {
          while (p ~ /^\//) p = substr(p, 2)
          gsub(/\/\/+/, "/", p)
          while (p ~ /^\.\//) p = substr(p, 3)
          gsub(/\/\.\//, "/", p)
          sub(/\/\.$/, "", p)
          sub(/\/+$/, "", p)
          return p
        }
        function regex(p,    out, i, c) {
          out = ""
          for (i = 1; i <= length(p); i++) {
            c = substr(p, i, 1)
            if (c == "*") {
              if (substr(p, i + 1, 1) == "*") {
                i++
                if (substr(p, i + 1, 1) == "/") i++
                out = out (i == length(p) ? ".*" : "(.*/)?")
              } else out = out "[^/]*"
            } else if (c == "?") out = out "[^/]"
            else if (index(".+()|{}$^", c)) out = out "\\" c
            else if (c == "\\" && i < length(p)) { i++; out = out "\\" substr(p, i, 1) }
            else out = out c
          }
          return "^" out "$"
        }
        function matches(re, path,    parts, k, n, prefix) {
          if (path ~ re) return 1
          n = split(path, parts, "/")
          prefix = ""
          for (k = 1; k < n; k++) {
            prefix = prefix (k > 1 ? "/" : "") parts[k]
            if (prefix ~ re) return 1
          }
          return 0
        }
        FNR == NR {
          line = $0
          sub(/^[ \t]+/, "", line); sub(/[ \t\r]+$/, "", line)
          if (line == "" || line ~ /^#/) next
          negate = 0
          if (line ~ /^!/) { negate = 1; line = substr(line, 2); sub(/^[ \t]+/, "", line) }
          line = clean(line)
          if (line == "") next
          n++; re[n] = regex(line); keep[n] = negate
          next
        }
        {
          out = 0
          for (i = 1; i <= n; i++) if (matches(re[i], $0)) out = !keep[i]
          if (!out) print
        }
      ' .dockerignore -
    else
      cat
    fi
}

# --- 3. Run the stage.
tmp=$(mktemp -d "${TMPDIR:-/tmp}/docker-rehearsal.XXXXXX")
if [ -z "${KEEP:-}" ]; then
  trap 'rm -rf "$tmp"' EXIT
fi
root=$tmp/root
mkdir -p "$root"
context_files >"$tmp/context"
echo "build context: $(wc -l <"$tmp/context") files after .dockerignore; rehearsing in $tmp"

# A RUN line as bare as Docker's: no variable of this shell's environment reaches it except what
# finds the toolchain and the crate cache. Above all no CARGO_TARGET_DIR: the build must land in
# the temporary folder.
run_env=(
  env -i
  "PATH=$PATH"
  "HOME=$HOME"
  "TMPDIR=${TMPDIR:-/tmp}"
)
for v in CARGO_HOME RUSTUP_HOME RUSTUP_TOOLCHAIN; do
  if [ -n "${!v:-}" ]; then run_env+=("$v=${!v}"); fi
done

workdir=/
# Where an image path lands in the temporary folder.
host() {
  case $1 in
    /*) printf '%s%s' "$root" "$1" ;;
    *) printf '%s%s/%s' "$root" "${workdir%/}" "$1" ;;
  esac
}

# COPY and RUN take a mode: `check` (every instruction is checked before any runs, so a form
# the rehearsal does not know fails at once) or `apply`.
copy() {
  local mode=$1 args=$2 words arg sources=() dest target s f rel n total=0
  read -ra words <<<"$args"
  for arg in "${words[@]}"; do
    case $arg in
      --chown=* | --chmod=* | --link) ;;
      --*) die "COPY $arg is not rehearsed: teach .ci/docker-rehearsal.sh, or leave it out of the $stage stage" ;;
      \[*) die "COPY in exec (JSON) form is not rehearsed: use the plain form" ;;
      *) sources+=("$arg") ;;
    esac
  done
  [ ${#sources[@]} -ge 2 ] || die "COPY $args: a source and a destination are needed"
  dest=${sources[-1]}
  unset 'sources[-1]'
  for s in "${sources[@]}"; do
    case $s in *[\*\?\[]*) die "COPY $s: wildcards are not rehearsed" ;; esac
  done
  [ "$mode" = apply ] || return 0
  target=$(host "$dest")
  for s in "${sources[@]}"; do
    s=${s#./}
    s=${s%/}
    if [ "$s" = . ]; then s=; fi
    n=0
    if grep -qxF -- "$s" "$tmp/context"; then
      if [[ $dest == */ || ${#sources[@]} -gt 1 || -d $target ]]; then
        f=$target/${s##*/}
      else
        f=$target
      fi
      mkdir -p "$(dirname "$f")"
      cp -p "$s" "$f"
      n=$((n + 1))
    else
      while IFS= read -r rel; do
        f=$target/${rel#"$s"/}
        mkdir -p "$(dirname "$f")"
        cp -p "$rel" "$f"
        n=$((n + 1))
      done < <(awk -v p="$s/" 'p == "/" || index($0, p) == 1' "$tmp/context")
      [ "$n" -gt 0 ] || die "COPY $s: not in the build context (missing, untracked, or excluded by .dockerignore)"
    fi
    total=$((total + n))
  done
  echo "   copied $total file(s)"
}

run() {
  local mode=$1 cmd=$2
  case $cmd in
    \[*) die "RUN in exec (JSON) form is not rehearsed: use the shell form" ;;
    --*) die "RUN ${cmd%% *} is not rehearsed: teach .ci/docker-rehearsal.sh, or leave it out of the $stage stage" ;;
  esac
  # The folder stands for the image's / only where paths are relative to WORKDIR; an absolute
  # path would reach this machine's own / instead.
  if grep -Eq '(^|[[:space:]=<>|;&(])/' <<<"${cmd//\/dev\/null/}"; then
    die "RUN names an absolute path, which the rehearsal would take on this machine's own /: keep the $stage stage's RUN lines relative to WORKDIR"
  fi
  [ "$mode" = apply ] || return 0
  mkdir -p "$(host .)"
  (cd "$(host .)" && "${run_env[@]}" /bin/sh -c "$cmd") || die "RUN failed (exit $?): $cmd"
}

stage_of "$stage" >"$tmp/stage"
[ -s "$tmp/stage" ] || die "no stage named $stage in the Dockerfile"
for mode in check apply; do
  workdir=/
  while IFS= read -r line; do
    instr=${line%%[[:space:]]*}
    args=${line#"$instr"}
    args=${args#"${args%%[![:space:]]*}"}
    [ "$mode" = check ] || echo "== $(date +%T) ${instr^^} $args"
    case ${instr^^} in
      WORKDIR)
        case $args in
          /*) workdir=$args ;;
          *) workdir=${workdir%/}/$args ;;
        esac
        [ "$mode" = check ] || mkdir -p "$(host .)"
        ;;
      COPY) copy "$mode" "$args" ;;
      RUN) run "$mode" "$args" ;;
      ENV | ARG)
        read -ra words <<<"$args"
        for kv in "${words[@]}"; do
          case $kv in
            *=*) [ "$mode" = check ] || run_env+=("$kv") ;;
            *) [ "${instr^^}" = ARG ] || die "ENV $args: use the NAME=VALUE form" ;;
          esac
        done
        ;;
      LABEL | EXPOSE | CMD | ENTRYPOINT | STOPSIGNAL | HEALTHCHECK | VOLUME) ;;
      *) die "${instr^^} is not rehearsed: teach .ci/docker-rehearsal.sh, or leave it out of the $stage stage" ;;
    esac
  done <"$tmp/stage"
done

# --- 4. What the image takes from this stage, and what it was built from.
echo "== $(date +%T) checks"
instructions >"$tmp/instructions"
sh deploy/cargo-stand-ins.sh list >"$tmp/targets"
while read -ra words; do
  [ "${words[0]^^}" = COPY ] || continue
  from=
  paths=()
  for arg in "${words[@]:1}"; do
    case $arg in
      --from=*) from=${arg#--from=} ;;
      --*) ;;
      *) paths+=("$arg") ;;
    esac
  done
  [ "$from" = "$stage" ] || continue
  for p in "${paths[@]:0:${#paths[@]}-1}"; do
    [ -e "$root/${p#/}" ] || die "the runtime stage copies $p from the $stage stage, which did not make it"
    echo "   the runtime stage's $p: $(du -h "$root/${p#/}" | cut -f1)"
  done
done <"$tmp/instructions"

bin_sources=0
while IFS=$'\t' read -r kind name path; do
  case $kind in test | bench | example) continue ;; esac
  built=$(host "$path")
  if ! cmp -s "$path" "$built"; then
    die "the $kind $name ($path) is not the checkout's file in the $stage stage: no COPY brings it"
  fi
  bin_sources=$((bin_sources + 1))
done <"$tmp/targets"
[ "$bin_sources" -gt 0 ] || die "cargo metadata names no library, binary or build script"
echo "   the $bin_sources source(s) cargo build compiles are the checkout's own"
echo "docker rehearsal: the $stage stage builds ($((SECONDS - started)) s)"
