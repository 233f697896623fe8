const TRIALS = JSON.parse(document.getElementById('trial-data').textContent);
function showTrial(n) {
  const t = TRIALS[String(n)];
  if (!t) return;
  const cmd = t.export_command || '(no artifact: ' + (t.fail_reason || t.status) + ')';
  document.getElementById('export-cmd').textContent = cmd;
  const shown = Object.assign({}, t); delete shown.export_command;
  document.getElementById('details').textContent = JSON.stringify(shown, null, 1);
  document.getElementById('picked').textContent = 'trial ' + n;
}
function copyCmd() {
  const c = document.getElementById('export-cmd').textContent;
  if (navigator.clipboard) navigator.clipboard.writeText(c);
}
window.addEventListener('load', function () {
  ['final', 'scatter'].forEach(function (id) {
    const sc = document.getElementById(id);
    if (sc && sc.on) sc.on('plotly_click', function (e) {
      if (e.points.length && e.points[0].customdata !== undefined) showTrial(e.points[0].customdata);
    });
  });
  document.querySelectorAll('#trials th').forEach(function (th, i) {
    th.addEventListener('click', function () {
      const body = document.querySelector('#trials tbody');
      const rows = Array.from(body.rows);
      const asc = th.dataset.dir !== 'asc';
      th.dataset.dir = asc ? 'asc' : 'desc';
      rows.sort(function (a, b) {
        const x = a.cells[i].dataset.v, y = b.cells[i].dataset.v;
        if (x === '' || y === '') return (x === '') - (y === '');  // blanks last either way
        const nx = Number(x), ny = Number(y);
        const c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  document.querySelectorAll('#trials tbody tr').forEach(function (tr) {
    tr.addEventListener('click', function () { showTrial(tr.dataset.trial); });
  });
});
