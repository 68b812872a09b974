#!/usr/bin/env bash
# Vendor the site's third-party JavaScript from pinned npm packages, so that the built book
# needs no CDN (it works offline, and readers online get the very same files).
#
#   bash scripts/vendor-js.sh OUTDIR        (the Makefile runs: bash scripts/vendor-js.sh _vendor)
#
# OUTDIR is listed in `html_extra_path` (_config.yml), so Sphinx copies OUTDIR/vendor/ to the
# root of the built site as vendor/:
#   vendor/mermaid/       mermaid.esm.min.mjs + chunks/mermaid.esm.min/*.mjs (the ESM build
#                         imports its chunks by relative path)                  [sphinxcontrib-mermaid]
#   vendor/plotly/        plotly-<version>.min.js, for the explorers' figures      [labkit.explorer]
#   vendor/requirejs/     require.js (the embed manager is an AMD bundle)       [myst-nb nb_ipywidgets_js]
#   vendor/html-manager/  embed-amd.js (@jupyter-widgets/html-manager, the 1.0.x line for
#                         ipywidgets 8, with the core widgets built in), the font files its
#                         bundled CSS refers to, and setup.js (written here; loaded between
#                         the two), which makes the bundle find those files here from a page
#                         at any depth and never ask a CDN for a widget module.
# Re-vendoring does not by itself refresh _build/html/vendor: Sphinx copies html_extra_path
# only when it writes pages, so rebuild with `make clean book` (or jupyter-book build --all).
# Only `npm pack` is used (one tarball per package, no dependency tree). The tarballs are
# checked against pinned sha512 digests. The script is idempotent: it rebuilds OUTDIR/vendor
# from scratch each run and touches OUTDIR/.complete only when everything succeeded.
set -euo pipefail

if [[ $# -ne 1 || -z "$1" ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUTDIR=$1

# Pinned versions. Mermaid: the version sphinxcontrib-mermaid 2.1.1 defaults to.
# html-manager: latest 1.0.x, whose @jupyter-widgets/controls ^5.0.13 matches ipywidgets 8.1.x.
MERMAID=mermaid@11.12.1
MERMAID_SHA=sha512-UlIZrRariB11TY1RtTgUWp65tphtBv4CSq7vyS2ZZ2TgoMjs2nloq+wFqxiwcxlhHUvs7DPGgMjs2aeQxz5h9g==
REQUIREJS=requirejs@2.3.8
REQUIREJS_SHA=sha512-7/cTSLOdYkNBNJcDMWf+luFvMriVm7eYxp4BcFCsAX0wF421Vyce5SXP17c+Jd5otXKGNehIonFlyQXSowL6Mw==
# plotly.js: the in-browser figures of labkit.explorer (the name of the copy is labkit.explorer.PLOTLY).
PLOTLY=plotly.js-dist-min@3.7.0
PLOTLY_SHA=sha512-IRWNnBJZmKss3URDnicBK2nvt/VTSi/MD1GnUscAYFjwSuN6g/CTde5R1UC0RYtblehj8rkT4BL8r05e/c8j5Q==
HTMLMANAGER=@jupyter-widgets/html-manager@1.0.15
HTMLMANAGER_SHA=sha512-5thBIV6ymNgmPVOHvzx+gGy8ZSKmSazhtGw4/c4xJDVzRhG9PTeQsRjF3FUTopvFi//SABeNz1yp47bCrJ3CQA==

for tool in npm node tar; do
    command -v "$tool" >/dev/null || { echo "vendor-js.sh: '$tool' is required but not found" >&2; exit 1; }
done

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vendor-js.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STAGE=$WORK/vendor
mkdir -p "$STAGE"

# fetch SPEC SHA512 NAME: npm pack SPEC into $WORK, check its digest, unpack to $WORK/NAME/package
fetch() {
    local spec=$1 want=$2 name=$3 tgz got
    tgz=$(cd "$WORK" && npm pack --loglevel=error "$spec" | tail -n 1)
    [[ -f "$WORK/$tgz" ]] || { echo "vendor-js.sh: npm pack $spec produced no tarball" >&2; exit 1; }
    got=$(node -e 'const c=require("crypto"),fs=require("fs");
        process.stdout.write("sha512-"+c.createHash("sha512").update(fs.readFileSync(process.argv[1])).digest("base64"))' \
        "$WORK/$tgz")
    if [[ "$got" != "$want" ]]; then
        echo "vendor-js.sh: checksum mismatch for $spec: got $got, expected $want" >&2
        exit 1
    fi
    mkdir -p "$WORK/$name"
    tar -xzf "$WORK/$tgz" -C "$WORK/$name"
    echo "vendor-js.sh: fetched $spec" >&2
}

# need FILE...: fail loudly if an expected file is missing from a package
need() {
    local f
    for f in "$@"; do
        [[ -f "$f" ]] || { echo "vendor-js.sh: expected file missing: $f" >&2; exit 1; }
    done
}

# --- mermaid: the ESM entry point and the chunks it imports (no source maps) ---------------
fetch "$MERMAID" "$MERMAID_SHA" mermaid
src=$WORK/mermaid/package
need "$src/dist/mermaid.esm.min.mjs" "$src/LICENSE"
mkdir -p "$STAGE/mermaid/chunks/mermaid.esm.min"
cp "$src/dist/mermaid.esm.min.mjs" "$src/LICENSE" "$STAGE/mermaid/"
cp "$src"/dist/chunks/mermaid.esm.min/*.mjs "$STAGE/mermaid/chunks/mermaid.esm.min/"

# --- require.js --------------------------------------------------------------------------
fetch "$REQUIREJS" "$REQUIREJS_SHA" requirejs
src=$WORK/requirejs/package
need "$src/require.js"
mkdir -p "$STAGE/requirejs"
cp "$src/require.js" "$STAGE/requirejs/"

# --- plotly.js, under the versioned name that labkit.explorer asks for ------------------------
fetch "$PLOTLY" "$PLOTLY_SHA" plotly
src=$WORK/plotly/package
need "$src/plotly.min.js" "$src/LICENSE"
mkdir -p "$STAGE/plotly"
cp "$src/plotly.min.js" "$STAGE/plotly/plotly-${PLOTLY##*@}.min.js"
cp "$src/LICENSE" "$STAGE/plotly/"

# --- ipywidgets embed manager ------------------------------------------------------------
fetch "$HTMLMANAGER" "$HTMLMANAGER_SHA" html-manager
src=$WORK/html-manager/package/dist
need "$src/embed-amd.js"
mkdir -p "$STAGE/html-manager"
cp "$src/embed-amd.js" "$STAGE/html-manager/"
# The bundle's CSS (Font Awesome) refers to hashed asset files next to it: copy exactly those.
assets=$(grep -oE '[0-9a-f]{20}\.(eot|svg|ttf|woff2?)' "$src/embed-amd.js" | sort -u)
[[ -n "$assets" ]] || { echo "vendor-js.sh: found no asset references in embed-amd.js" >&2; exit 1; }
for a in $assets; do
    need "$src/$a"
    cp "$src/$a" "$STAGE/html-manager/"
done
# setup.js is loaded between require.js and embed-amd.js (see nb_ipywidgets_js in _config.yml);
# it must be a classic script (it reads document.currentScript). It keeps the bundle off the
# network and makes it work from a page at any depth:
#  - Each AMD module of the bundle sets its webpack public path (where its CSS finds the Font
#    Awesome files) to the folder of its require.js module URL, which by default is the page's
#    own folder + "@jupyter-widgets/...": 404s. Mapping the module names to this folder makes
#    them all look for the font files here, next to embed-amd.js.
#  - A widget module that is not built in (a third-party widget) is looked up in the site's
#    vendor/ folder, never on a CDN: it fails visibly (404) instead of silently needing the
#    network. The core widgets (@jupyter-widgets/base, controls, output) are built in.
#  - The bundle typesets widget labels with MathJax 2's `MathJax.Hub.Queue`, but the site runs
#    MathJax 3, which has no Hub: every labelled widget threw "reading 'Queue'". A small Hub
#    whose Queue calls MathJax 3's typesetPromise is kept on whatever object window.MathJax is
#    (MathJax 3 replaces its config object with itself when it starts).
cat > "$STAGE/html-manager/setup.js" <<'EOF'
/* Written by scripts/vendor-js.sh: serve the ipywidgets embed manager from vendor/ only. */
(function () {
  var hub = { Queue: function (command) {
    var element = command && command[2], mathjax = window.MathJax;
    if (element && mathjax && mathjax.typesetPromise) mathjax.typesetPromise([element]).catch(function () {});
  } };
  var current = window.MathJax;
  var withHub = function (value) {
    if (value && typeof value === "object" && !value.Hub) value.Hub = hub;
    return value;
  };
  withHub(current);
  Object.defineProperty(window, "MathJax", { configurable: true, enumerable: true,
    get: function () { return current; }, set: function (value) { current = withHub(value); } });
})();
(function () {
  var script = document.currentScript;
  var here = new URL("./", script.src).href.replace(/\/$/, "");
  if (typeof window.requirejs === "undefined") {
    throw new Error("vendor/html-manager/setup.js: load vendor/requirejs/require.js first");
  }
  window.requirejs.config({
    paths: {
      "@jupyter-widgets": here,
      "@jupyter-widgets/html-manager/dist": here
    }
  });
  window.__jupyter_widgets_assets_path__ = here + "/";
  script.setAttribute("data-jupyter-widgets-cdn", new URL("../", here + "/").href);
  script.setAttribute("data-jupyter-widgets-cdn-only", "");
})();
EOF

# --- install -----------------------------------------------------------------------------
rm -f "$OUTDIR/.complete"
rm -rf "$OUTDIR/vendor"
mv "$STAGE" "$OUTDIR/vendor"
touch "$OUTDIR/.complete"
echo "vendor-js.sh: $(find "$OUTDIR/vendor" -type f | wc -l | tr -d ' ') files," \
     "$(du -sk "$OUTDIR/vendor" | cut -f1) KiB in $OUTDIR/vendor" >&2
