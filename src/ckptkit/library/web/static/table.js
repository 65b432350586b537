// The index table: the rows come as JSON in the page (#rows); this script draws the ones
// that pass the filters, sorted as asked, at most LIMIT at a time (a library of 10,000
// files would otherwise be 100,000 table cells for the browser to lay out). Text goes in
// with textContent only, never as markup. Filters live in the address (?q=...&family=...):
// a link can open the table filtered, and Back returns to it.
"use strict";

(function () {
  const LIMIT = 500;
  const table = document.getElementById("models");
  const source = document.getElementById("rows");
  if (!table || !source) return;
  const rows = JSON.parse(source.textContent);
  const body = table.tBodies[0];
  const headers = Array.from(table.tHead.rows[0].cells);
  const text = document.getElementById("filter");
  const selects = Array.from(document.querySelectorAll("select[data-key]"));
  const shown = document.getElementById("shown");
  const more = document.getElementById("more");
  const keys = headers.map((h) => h.dataset.key);
  for (const r of rows) r._text = keys.map((k) => r[k]).join(" ").toLowerCase();
  let sortKey = null;
  let descending = false;
  let limit = LIMIT;

  function cell(row, key) {
    const td = document.createElement("td");
    if (key === "name") {
      const a = document.createElement("a");
      a.href = `/model/${row.id}`;
      a.textContent = row.name;
      td.append(a);
    } else {
      td.textContent = key === "size" ? row.size_text
        : key === "mtime" ? row.modified : row[key];
    }
    const header = headers[keys.indexOf(key)];
    if (header.dataset.class) td.className = header.dataset.class;
    if (key === "verdict") td.classList.add(`verdict-${row.verdict}`);
    return td;
  }

  function compare(a, b) {
    if (typeof a === "number") return a - b;
    return String(a).localeCompare(String(b), undefined, { numeric: true, sensitivity: "base" });
  }

  function render() {
    const terms = text.value.toLowerCase().split(/\s+/).filter(Boolean);
    const wanted = selects.filter((s) => s.value).map((s) => [s.dataset.key, s.value]);
    let found = rows.filter((r) => terms.every((t) => r._text.includes(t)) &&
      wanted.every(([k, v]) => r[k] === v));
    if (sortKey) {
      found = found.slice().sort((a, b) => compare(a[sortKey], b[sortKey]));
      if (descending) found.reverse();
    }
    body.replaceChildren(...found.slice(0, limit).map((r) => {
      const tr = document.createElement("tr");
      tr.append(...keys.map((k) => cell(r, k)));
      return tr;
    }));
    shown.textContent = found.length === rows.length ? `${rows.length} models`
      : `${found.length} of ${rows.length} models`;
    more.hidden = found.length <= limit;
    more.textContent = `show all ${found.length} (${limit} shown)`;
  }

  function filtered() {
    limit = LIMIT;
    render();
    const params = new URLSearchParams();
    if (text.value) params.set("q", text.value);
    for (const s of selects) if (s.value) params.set(s.name, s.value);
    const query = params.toString();
    history.replaceState(null, "", query ? `?${query}` : location.pathname);
  }

  headers.forEach((header) => {
    header.querySelector("button").addEventListener("click", () => {
      descending = sortKey === header.dataset.key && !descending;
      sortKey = header.dataset.key;
      headers.forEach((h) => h.setAttribute("aria-sort", h !== header ? "none"
        : descending ? "descending" : "ascending"));
      render();
    });
  });
  more.addEventListener("click", () => { limit = Infinity; render(); });

  const start = new URLSearchParams(location.search);
  text.value = start.get("q") || "";
  for (const s of selects) {
    const v = start.get(s.name);
    if (v !== null && Array.from(s.options).some((o) => o.value === v)) s.value = v;
  }
  text.addEventListener("input", filtered);
  selects.forEach((s) => s.addEventListener("change", filtered));
  render();
})();
