"""Explorers that respond everywhere, the static site included: every state is drawn in advance.

    explorer(draw, m=range(0, 13), theta=[0.25, 0.5, 1.0])

calls ``draw(m=..., theta=...)`` for every combination of the listed values; each call returns a plotly
figure as plain data, ``{"data": [...traces...], "layout": {...}}``. The result is HTML with one slider
per control and the figure, drawn in the browser by plotly.js: a move of a slider shows the state drawn
for it, with no Python kernel behind the page. plotly.js comes from the site's own copy
(``vendor/plotly/``, see ``scripts/vendor-js.sh``), so the site works offline; a notebook running
outside the site (Colab, Jupyter) loads it from plotly's CDN.
"""

import html
import itertools
import json
import uuid
from collections.abc import Callable, Sequence

from IPython.display import HTML

PLOTLY = "plotly-3.7.0.min.js"  # the file name of scripts/vendor-js.sh's copy, and of plotly's CDN
MAX_STATES = 1000  # the whole grid is written into the page


def _rounded(x, digits: int = 4):
    """``x`` with every float rounded to ``digits`` significant digits: a smaller page, the same picture."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: _rounded(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v, digits) for v in x]
    return x


def explorer(draw: Callable[..., dict], start: dict | None = None, height: int = 380,
             **controls: Sequence) -> HTML:
    """An explorer of ``draw`` with one slider per control, starting at ``start`` (the first values by default)."""
    names, values = list(controls), [list(v) for v in controls.values()]
    grid = list(itertools.product(*(range(len(v)) for v in values)))
    if len(grid) > MAX_STATES:
        raise ValueError(f"{len(grid)} states: at most {MAX_STATES}, so that the page stays small")
    states = {",".join(map(str, index)): _rounded(draw(**{n: v[i] for n, v, i in zip(names, values, index)}))
              for index in grid}
    layouts = [state["layout"] for state in states.values()]
    shared = {k: v for k, v in layouts[0].items() if all(layout.get(k) == v for layout in layouts)}
    for layout in layouts:  # what every state shares is written once
        for k in shared:
            del layout[k]
    first = [v.index(start[n]) if start and n in start else 0 for n, v in zip(names, values)]
    sliders = "".join(
        f'<label style="margin-right:1.5em">{html.escape(n)} <input type="range" min="0" max="{len(v) - 1}" '
        f'value="{i}" style="vertical-align:middle"> <output>{html.escape(str(v[i]))}</output></label>'
        for n, v, i in zip(names, values, first))
    labels = [[str(x) for x in v] for v in values]
    return HTML(TEMPLATE.replace("{id}", f"explorer-{uuid.uuid4().hex[:8]}").replace("{sliders}", sliders)
                .replace("{height}", str(height)).replace("{plotly}", PLOTLY)
                .replace("{labels}", json.dumps(labels)).replace("{shared}", json.dumps(shared))
                .replace("{states}", json.dumps(states)))


# The page's explorer. plotly.js is loaded once per page, with require.js's `define` hidden while it
# loads (plotly.js would otherwise register as an AMD module and never set window.Plotly).
TEMPLATE = """\
<div id="{id}" class="labkit-explorer">
<div>{sliders}</div>
<div class="labkit-explorer-plot" style="height:{height}px"></div>
<p class="labkit-explorer-note" hidden>This explorer needs plotly.js: the course site serves its own copy,
and a notebook loads it from cdn.plot.ly.</p>
</div>
<script>
(function () {
  var root = document.getElementById("{id}"), labels = {labels}, shared = {shared}, states = {states};
  var inputs = root.querySelectorAll("input");
  function show() {
    var key = Array.prototype.map.call(inputs, function (input, i) {
      input.nextElementSibling.textContent = labels[i][input.value];
      return input.value;
    }).join(",");
    var state = states[key];
    Plotly.react(root.querySelector(".labkit-explorer-plot"), state.data, Object.assign({}, shared, state.layout),
                 {displayModeBar: false, responsive: true});
  }
  function start() {
    inputs.forEach(function (input) { input.addEventListener("input", show); });
    show();
  }
  if (window.Plotly) { start(); return; }
  var sources = [(document.documentElement.dataset.content_root || "") + "vendor/plotly/{plotly}",
                 "https://cdn.plot.ly/{plotly}"];
  (function load(i) {
    if (window.Plotly) { start(); return; }
    if (i === sources.length) { root.querySelector(".labkit-explorer-note").hidden = false; return; }
    var script = document.createElement("script"), define = window.define;
    window.define = undefined;
    script.src = sources[i];
    script.onload = function () { window.define = define; start(); };
    script.onerror = function () { window.define = define; script.remove(); load(i + 1); };
    document.head.appendChild(script);
  })(0);
})();
</script>
"""
