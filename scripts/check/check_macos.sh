#!/usr/bin/env bash
# Type-checks kiln's macOS build for Apple Silicon with Metal, on Linux:
#   cargo check --release --target aarch64-apple-darwin --features metal
# so a change that breaks the Apple path fails CI (.ci/run runs this). Nothing here runs Metal.
#
# What it needs, installed when missing:
#   - the target's standard library (rustup target add aarch64-apple-darwin);
#   - a C compiler for the target, for the C code of zstd-sys (Parquet) and onig_sys
#     (tokenizers): zig from PyPI's `ziglang` package, in ~/.cache/kiln/zig (KILN_ZIG_DIR),
#     behind a small wrapper that drops the cc crate's `--target=arm64-apple-macosx` and
#     `-mmacosx-version-min=...` arguments, which zig does not take.
# Build output goes to target/macos, so later runs only re-check kiln itself.
set -euo pipefail
cd "$(dirname "$0")/../.."

target=aarch64-apple-darwin
if ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target"
fi

zig_dir=${KILN_ZIG_DIR:-$HOME/.cache/kiln/zig}
if ! PYTHONPATH="$zig_dir" python3 -m ziglang version >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check --target "$zig_dir" ziglang
fi

bin="$zig_dir/bin"
mkdir -p "$bin"
cat > "$bin/cc-$target" <<EOF
#!/usr/bin/env bash
args=()
for a in "\$@"; do
    case "\$a" in
        --target=*|-mmacosx-version-min=*) ;;
        *) args+=("\$a") ;;
    esac
done
PYTHONPATH="$zig_dir" exec python3 -m ziglang cc -target aarch64-macos "\${args[@]}"
EOF
cat > "$bin/ar-$target" <<EOF
#!/usr/bin/env bash
PYTHONPATH="$zig_dir" exec python3 -m ziglang ar "\$@"
EOF
chmod +x "$bin/cc-$target" "$bin/ar-$target"

export CC_aarch64_apple_darwin="$bin/cc-$target"
export AR_aarch64_apple_darwin="$bin/ar-$target"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR_MACOS:-target/macos}
cargo check --release --target "$target" --features metal --all-targets
echo "macOS (aarch64-apple-darwin, metal) type-check passed"
