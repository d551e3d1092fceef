// MathJax 3 (vendored: tex-svg-full.js, Apache-2.0, see MATHJAX-LICENSE) for the formulas
// that pymdownx.arithmatex marks with the class "arithmatex". SVG output needs no fonts,
// so the site renders math offline.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};
