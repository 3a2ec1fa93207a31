#!/usr/bin/env bash
# Install Debian's CUDA toolkit (nvcc, cuBLAS headers) when nvcc is absent, non-interactively, as root.
# Debian ships nvidia-cuda-toolkit in the non-free component (CUDA 11.8 on bookworm); this script adds
# contrib + non-free for the running release in a separate sources file and leaves the others untouched.
# Usage: tools/install-cuda-toolkit.sh   (prints the nvcc it finds or installed; exit 0 when nvcc works)
set -euo pipefail

find_nvcc() {
    if command -v nvcc >/dev/null 2>&1; then command -v nvcc; return 0; fi
    for p in /usr/local/cuda/bin/nvcc /usr/lib/nvidia-cuda-toolkit/bin/nvcc; do
        if [ -x "$p" ]; then echo "$p"; return 0; fi
    done
    return 1
}

if nvcc_path=$(find_nvcc); then
    echo "install-cuda-toolkit: nvcc already present: $nvcc_path"
    "$nvcc_path" --version | tail -n 2
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "install-cuda-toolkit: nvcc is missing and this is not root; run as root (or install nvidia-cuda-toolkit)." >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-cuda-toolkit: nvcc is missing and apt-get is not available; install the CUDA toolkit by hand." >&2
    exit 1
fi

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
list=/etc/apt/sources.list.d/pea-cuda-nonfree.sources
if ! grep -rqsE '(^|[[:space:]])non-free([[:space:]]|$)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "install-cuda-toolkit: enabling contrib non-free for $codename in $list"
    cat > "$list" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: $codename ${codename}-updates
Components: contrib non-free non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends nvidia-cuda-toolkit

nvcc_path=$(find_nvcc)
echo "install-cuda-toolkit: installed $nvcc_path"
"$nvcc_path" --version | tail -n 2
