#!/usr/bin/env bash
# Fetches the Debian wallpaper packages the tiny models are trained on, unpacks them under the
# git-ignored data/ (no install), and copies the photographs named in docs/data/photos.txt to
# data/photos/{train,heldout}/.
#
#   scripts/fetch-photos.sh            # download + unpack + copy by the committed list
#   scripts/fetch-photos.sh --unpack   # download + unpack only (to review candidates)
#
# Needs apt-get and dpkg-deb (Debian/Ubuntu). Runs `apt-get update` when a package is unknown.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
data="$root/data"
list="$root/docs/data/photos.txt"
packages=(plasma-workspace-wallpapers lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 mate-backgrounds)

unpack_only=false
case "${1:-}" in
  "") ;;
  --unpack) unpack_only=true ;;
  *) echo "usage: $0 [--unpack]" >&2; exit 2 ;;
esac

mkdir -p "$data/debs" "$data/pkgs"
cd "$data/debs"
for pkg in "${packages[@]}"; do
  if ! compgen -G "${pkg}_*.deb" >/dev/null; then
    if ! apt-cache show "$pkg" >/dev/null 2>&1; then
      apt-get update
    fi
    apt-get download "$pkg"
  fi
  deb=$(compgen -G "${pkg}_*.deb" | head -n1)
  if [ ! -d "$data/pkgs/$pkg" ]; then
    dpkg-deb -x "$deb" "$data/pkgs/$pkg.tmp"
    mv "$data/pkgs/$pkg.tmp" "$data/pkgs/$pkg"
  fi
  echo "unpacked $deb -> data/pkgs/$pkg"
done

$unpack_only && exit 0

[ -f "$list" ] || { echo "missing $list" >&2; exit 1; }
rm -rf "$data/photos"
mkdir -p "$data/photos/train" "$data/photos/heldout"
count=0
# photos.txt: "<split> <name> <path under data/pkgs>" lines; '#' starts a comment.
while read -r split name path; do
  case "$split" in ""|\#*) continue ;; esac
  case "$split" in train|heldout) ;; *) echo "$list: bad split '$split' for $name" >&2; exit 1 ;; esac
  src="$data/pkgs/$path"
  [ -f "$src" ] || { echo "$list: missing file $path" >&2; exit 1; }
  ext="${path##*.}"
  cp "$src" "$data/photos/$split/$name.$ext"
  count=$((count + 1))
done <"$list"
echo "copied $count photos to data/photos/{train,heldout}"
