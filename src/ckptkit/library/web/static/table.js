// The index table: sorting by any column and filtering, in the browser, over the rows the
// server wrote into the page (so the page also reads without scripts). Filters live in the
// address (?q=...&family=...): a link can open the table filtered, and Back returns to it.
"use strict";

(function () {
  const table = document.getElementById("models");
  if (!table) return;
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const headers = Array.from(table.tHead.rows[0].cells);
  const text = document.getElementById("filter");
  const selects = Array.from(document.querySelectorAll("select[data-column]"));
  const shown = document.getElementById("shown");

  function cellKey(row, index) {
    const cell = row.cells[index];
    return cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent.trim();
  }

  function compare(a, b, numeric) {
    if (numeric) return Number(a) - Number(b);
    return a.localeCompare(b, undefined, { numeric: true, sensitivity: "base" });
  }

  function sortBy(index, descending) {
    const numeric = headers[index].dataset.type === "number";
    const sorted = rows.slice().sort((r, s) => {
      const order = compare(cellKey(r, index), cellKey(s, index), numeric);
      return descending ? -order : order;
    });
    headers.forEach((h, i) => h.setAttribute("aria-sort",
      i === index ? (descending ? "descending" : "ascending") : "none"));
    body.append(...sorted);
  }

  headers.forEach((header, index) => {
    const button = header.querySelector("button");
    if (!button) return;
    button.addEventListener("click", () => {
      sortBy(index, header.getAttribute("aria-sort") === "ascending");
    });
  });

  function apply() {
    const terms = text.value.toLowerCase().split(/\s+/).filter(Boolean);
    const wanted = selects.map((s) => [Number(s.dataset.column), s.value]);
    let count = 0;
    for (const row of rows) {
      const hay = row.textContent.toLowerCase();
      const ok = terms.every((t) => hay.includes(t)) &&
        wanted.every(([i, v]) => !v || row.cells[i].dataset.value === v);
      row.hidden = !ok;
      if (ok) count += 1;
    }
    shown.textContent = count === rows.length ? `${rows.length} models`
      : `${count} of ${rows.length} models`;
    const params = new URLSearchParams();
    if (text.value) params.set("q", text.value);
    for (const s of selects) if (s.value) params.set(s.name, s.value);
    const query = params.toString();
    history.replaceState(null, "", query ? `?${query}` : location.pathname);
  }

  const start = new URLSearchParams(location.search);
  text.value = start.get("q") || "";
  for (const s of selects) {
    const v = start.get(s.name);
    if (v !== null && Array.from(s.options).some((o) => o.value === v)) s.value = v;
  }
  text.addEventListener("input", apply);
  selects.forEach((s) => s.addEventListener("change", apply));
  apply();
})();
