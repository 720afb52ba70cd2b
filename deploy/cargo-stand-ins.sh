#!/bin/sh
# Stand-in sources for the Dockerfile's dependency layer (see the builder stage there).
#
#   sh deploy/cargo-stand-ins.sh list    # every target of the package: kind, name, source path
#   sh deploy/cargo-stand-ins.sh write   # a stand-in for every target whose source is absent
#   sh deploy/cargo-stand-ins.sh drop    # remove the stand-ins of what `cargo build` compiles
#
# Run it in the package's root. That layer copies only the manifest, so the target sources are
# absent, and cargo refuses a manifest with an absent target source even for `cargo build` (a
# missing [[bench]] file broke `docker build`). The targets come from the manifest, not from a
# hand-kept list, so a target or a build script added later gets its stand-in without an edit here.
#
# POSIX sh, sed and awk only: the rust:*-slim image has no jq or python.
set -eu

# The first line of every stand-in: how `drop` knows a file is one (never a real source).
MARK='// stand-in written by deploy/cargo-stand-ins.sh for the dependency layer'
TAB=$(printf '\t')

# One line per target, `kind<TAB>name<TAB>path`, the path relative to this folder, as cargo sees
# them: a target declared without a `path` whose default file is absent is missing here ([[bench]]
# name = "x" without benches/x.rs is dropped without a word; a [[bin]] like it fails the command).
metadata() {
  root=$(pwd -P)
  cargo metadata --no-deps --format-version 1 >"$tmp/metadata.json"
  sed 's/{"kind":\["/\
/g' "$tmp/metadata.json" \
    | sed -n "s/^\([a-z-]*\)\"[^}]*\"name\":\"\([^\"]*\)\"[^}]*\"src_path\":\"\([^\"]*\)\".*/\1$TAB\2$TAB\3/p" \
    | while IFS="$TAB" read -r kind name path; do
        printf '%s\t%s\t%s\n' "$(family "$kind")" "$name" "${path#"$root"/}"
      done
}

# The same for what Cargo.toml declares, read without cargo (which needs the files first): the
# [lib], [[bin]], [[test]], [[bench]] and [[example]] tables and [package]'s `build`, each at its
# `path` or at cargo's default path for its kind.
declared() {
  awk -v OFS="$TAB" '
    function value(line) {
      sub(/^[^=]*=[ \t]*/, "", line)
      quote = substr(line, 1, 1)
      line = substr(line, 2)
      sub(quote ".*", "", line)
      return line
    }
    function flush() {
      if (kind != "") targets[++n] = kind OFS name OFS path
      kind = ""
    }
    /^[ \t]*\[/ {
      flush()
      section = $0
      gsub(/[ \t]|#.*/, "", section)
      if (section ~ /^\[\[(bin|test|bench|example)\]\]$/) { kind = section; gsub(/\[|\]/, "", kind) }
      if (section == "[lib]") kind = "lib"
      name = "-"; path = ""
      next
    }
    section == "[package]" && /^[ \t]*name[ \t]*=/ { package = value($0) }
    section == "[package]" && /^[ \t]*build[ \t]*=[ \t]*["\047]/ { build = value($0) }
    kind != "" && /^[ \t]*name[ \t]*=/ { name = value($0) }
    kind != "" && /^[ \t]*path[ \t]*=/ { path = value($0) }
    END {
      flush()
      if (build != "") print "custom-build", "build-script-build", build
      for (i = 1; i <= n; i++) {
        split(targets[i], t, OFS)
        if (t[3] == "") {
          if (t[1] == "lib") t[3] = "src/lib.rs"
          else if (t[1] == "bin") t[3] = (t[2] == package ? "src/main.rs" : "src/bin/" t[2] ".rs")
          else if (t[1] == "test") t[3] = "tests/" t[2] ".rs"
          else if (t[1] == "bench") t[3] = "benches/" t[2] ".rs"
          else t[3] = "examples/" t[2] ".rs"
        }
        print t[1], t[2], t[3]
      }
    }
  ' Cargo.toml
}

# A library's crate types (rlib, cdylib, proc-macro, ...) are one family: the library.
family() {
  case $1 in
    bin | test | bench | example | custom-build) echo "$1" ;;
    *) echo lib ;;
  esac
}

# A stand-in for every target read from stdin whose source is absent.
write() {
  while IFS="$TAB" read -r kind name path; do
    [ -e "$path" ] && continue
    mkdir -p "$(dirname "$path")"
    # One text fits every kind: a library ignores the unused `main`.
    printf '%s\n#![allow(dead_code)]\nfn main() {}\n' "$MARK" >"$path"
    echo "stand-in for the $kind $name: $path"
  done
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

case ${1:-} in
  list)
    metadata
    ;;
  write)
    # What the manifest declares first, so that cargo can read it; then whatever else cargo names
    # (a target spelled in a way the reading above does not know).
    declared >"$tmp/declared"
    write <"$tmp/declared"
    metadata >"$tmp/targets"
    write <"$tmp/targets"
    ;;
  drop)
    # Tests, benches and examples keep theirs: `cargo build` only checks that they exist. The
    # library, the binaries and a build script lose theirs, so that a real source the next step
    # forgot to copy fails the build instead of shipping a stand-in.
    metadata >"$tmp/targets"
    while IFS="$TAB" read -r kind name path; do
      case $kind in test | bench | example) continue ;; esac
      if [ -f "$path" ] && [ "$(head -n 1 "$path")" = "$MARK" ]; then
        rm "$path"
        echo "dropped the stand-in for the $kind $name: $path"
      fi
    done <"$tmp/targets"
    ;;
  *)
    echo "usage: sh deploy/cargo-stand-ins.sh list|write|drop" >&2
    exit 2
    ;;
esac
