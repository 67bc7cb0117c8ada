#!/usr/bin/env bash
# Builds the Xen Test Framework (andyhhp/xtf) from a fetched snapshot, outside the repository,
# for the `--abi xen` acceptance tests (tests/vmm_xen.rs). Never copies XTF into the repo.
#
#   scripts/xtf.sh            build (idempotent) and print the build directory
#
# Environment:
#   XTF_GIT   git directory of the snapshot (default: /work/.mirror/andyhhp+xtf/repo, where
#             the session tools' `fetch github:andyhhp/xtf` puts it)
#   XTF_URL   cloned (shallow, to ~/.cache/previrt/xtf.git) when XTF_GIT has no snapshot and
#             nothing is built yet (default: https://github.com/andyhhp/xtf.git)
#   XTF_OUT   build directory (default: ~/.cache/previrt/xtf)
#   XTF_TESTS tests to build (default: "example selftest")
# Result: $XTF_OUT/tests/<name>/test-hvm64-<name>.
set -euo pipefail

git_dir=${XTF_GIT:-/work/.mirror/andyhhp+xtf/repo}
out=${XTF_OUT:-$HOME/.cache/previrt/xtf}
tests=${XTF_TESTS:-example selftest}

built() {
  for t in $tests; do [ -f "$out/tests/$t/test-hvm64-$t" ] || return 1; done
}
if ! git --git-dir="$git_dir" rev-parse --verify -q HEAD >/dev/null 2>&1; then
  # Without the snapshot, a complete earlier build in the cache still serves; on a fresh
  # machine (CI) a shallow clone from $XTF_URL goes to the cache beside it.
  if built; then echo "$out"; exit 0; fi
  url=${XTF_URL:-https://github.com/andyhhp/xtf.git}
  clone="$HOME/.cache/previrt/xtf.git"
  if ! git --git-dir="$clone" rev-parse --verify -q HEAD >/dev/null 2>&1; then
    rm -rf "$clone.tmp"
    if ! git clone -q --bare --depth 1 "$url" "$clone.tmp" >&2; then
      rm -rf "$clone.tmp"
      echo "xtf.sh: no XTF snapshot at $git_dir, no built cache in $out, and cloning $url failed (network? or fetch github:andyhhp/xtf, or set XTF_GIT)" >&2
      exit 2
    fi
    rm -rf "$clone"
    mv "$clone.tmp" "$clone"
  fi
  git_dir=$clone
fi
for t in make gcc ld objcopy python3; do
  command -v "$t" >/dev/null 2>&1 || { echo "xtf.sh: $t missing; run scripts/install-deps.sh" >&2; exit 2; }
done

rev=$(git --git-dir="$git_dir" rev-parse HEAD)
if [ "$(cat "$out/.rev" 2>/dev/null || true)" != "$rev" ]; then
  rm -rf "$out.tmp"
  mkdir -p "$out.tmp"
  git --git-dir="$git_dir" archive --format=tar HEAD | tar -x -C "$out.tmp"
  echo "$rev" >"$out.tmp/.rev"
  rm -rf "$out"
  mv "$out.tmp" "$out"
fi

targets=()
for t in $tests; do targets+=("$out/tests/$t"); done
make -s -C "$out" -j"$(nproc)" TESTS="${targets[*]}" >&2
for t in $tests; do
  [ -f "$out/tests/$t/test-hvm64-$t" ] || { echo "xtf.sh: test-hvm64-$t was not built" >&2; exit 1; }
done
echo "$out"
