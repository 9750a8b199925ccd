// The fleet: every node's row, loaded once (GET /ui/fleet) and kept current by the live stream, and the view of it:
// counts by liveness and health, search, label filter, sort and pages. 5,000 rows stay in memory; only one page of
// them is in the document.

import { get } from './api.js';
import { age, badge, duration, h, labelText, link, nodeHash, syncClock } from './dom.js';

export const PAGE = 100;
const LIVENESS = ['online', 'suspected', 'failed', 'offline'];
const HEALTH = ['healthy', 'degraded', 'unhealthy'];
const COLUMNS = [
  ['id', 'Node'], ['liveness', 'Liveness'], ['health', 'Health'], ['last_seen', 'Last seen'],
  ['profile', 'Profile'], ['version', 'Agent'], ['running', 'Running steps'], ['labels', 'Labels'],
];

export const fleet = { rows: new Map(), seq: null, overloaded: false, name: '' };
const view = { query: '', label: '', liveness: '', health: '', sort: 'id', descending: false, page: 0 };
let mounted = null;
let renderPending = false;
let renders = 0;

export async function loadFleet() {
  const snapshot = await get('/ui/fleet');
  syncClock(snapshot.now);
  fleet.rows = new Map(snapshot.nodes.map((row) => [row.id, row]));
  fleet.seq = snapshot.seq;
  fleet.overloaded = snapshot.overloaded;
  fleet.name = snapshot.fleet;
  scheduleRender();
  return snapshot.seq;
}

export function applyNode(row) {
  if (row.gone) fleet.rows.delete(row.id);
  else fleet.rows.set(row.id, row);
  scheduleRender();
}

export function applyHub(state) {
  fleet.overloaded = state.overloaded;
  scheduleRender();
}

// Seen "within 2 heartbeats" while online: heartbeats are not journaled, so an online node's last_seen on the
// stream is only as new as its last change; online means the hub heard it within two heartbeats.
function lastSeen(row) {
  return row.liveness === 'online' ? `< ${duration(2 * row.hb)} ago` : age(row.last_seen);
}

function healthText(row) {
  const cause = row.health_cause;
  if (!cause) return '';
  const figures = cause.value !== null && cause.value !== undefined ? ` ${cause.metric} ${cause.value}` : '';
  return `${cause.recovered ? 'recovered: ' : ''}${cause.reason || figures}`;
}

function sortKey(row, column) {
  if (column === 'last_seen') return row.liveness === 'online' ? Number.MAX_SAFE_INTEGER : row.last_seen;
  if (column === 'running') return row.running.length;
  if (column === 'labels') return labelText(row.labels);
  const value = row[column];
  return value === null || value === undefined ? '' : value;
}

function selected() {
  const query = view.query.trim().toLowerCase();
  const [labelKey, labelValue] = view.label.includes('=') ? view.label.split('=', 2).map((s) => s.trim()) : [view.label.trim(), null];
  const out = [];
  for (const row of fleet.rows.values()) {
    if (view.liveness && row.liveness !== view.liveness) continue;
    if (view.health && row.health !== view.health) continue;
    if (labelKey && !(Object.hasOwn(row.labels, labelKey) && (labelValue === null || row.labels[labelKey] === labelValue))) continue;
    if (query) {
      const text = `${row.id} ${row.profile} ${row.version || ''} ${row.liveness} ${row.health} ${row.liveness_reason} ${labelText(row.labels)}`;
      if (!text.toLowerCase().includes(query)) continue;
    }
    out.push(row);
  }
  const column = view.sort;
  const sign = view.descending ? -1 : 1;
  out.sort((a, b) => {
    const x = sortKey(a, column);
    const y = sortKey(b, column);
    return (x < y ? -1 : x > y ? 1 : a.id < b.id ? -1 : 1) * sign;
  });
  return out;
}

function counts() {
  const by = {};
  for (const row of fleet.rows.values()) {
    by[row.liveness] = (by[row.liveness] || 0) + 1;
    by[row.health] = (by[row.health] || 0) + 1;
  }
  return by;
}

function countButtons(kind, states, by) {
  return h('div', { class: 'counts' }, h('span', { class: 'count-title', text: kind }), states.map((state) => {
    const active = view[kind] === state;
    return h('button', {
      type: 'button', class: `count ${active ? 'active' : ''}`, 'data-count': state,
      onclick: () => { view[kind] = active ? '' : state; view.page = 0; render(); },
    }, badge(state), h('strong', { text: String(by[state] || 0) }));
  }));
}

function rowElement(row) {
  const running = row.running.length > 3 ? `${row.running.slice(0, 3).join(', ')} +${row.running.length - 3}` : row.running.join(', ');
  const flags = [row.draining && 'draining', row.throttled && 'throttled', row.breaker !== 'closed' && `breaker ${row.breaker}`,
    row.conflict && 'identity conflict', row.removed && 'removed'].filter(Boolean).join(', ');
  return h('tr', { 'data-node': row.id },
    h('td', {}, link(nodeHash(row.id), row.id), flags ? h('div', { class: 'flags', text: flags }) : null),
    h('td', {}, badge(row.liveness), h('div', { class: 'reason', text: row.liveness_reason })),
    h('td', {}, badge(row.health), h('div', { class: 'reason', text: healthText(row) })),
    h('td', { text: lastSeen(row) }),
    h('td', { text: row.profile || '-' }),
    h('td', { text: row.version || '-' }),
    h('td', { text: running || '-' }),
    h('td', { class: 'labels', text: labelText(row.labels) }));
}

function render() {
  renderPending = false;
  renderedAt = performance.now();
  if (!mounted) return;
  const rows = selected();
  const pages = Math.max(1, Math.ceil(rows.length / PAGE));
  view.page = Math.min(view.page, pages - 1);
  const start = view.page * PAGE;
  const by = counts();
  mounted.counts.replaceChildren(countButtons('liveness', LIVENESS, by), countButtons('health', HEALTH, by));
  if (fleet.overloaded) mounted.counts.append(h('div', { class: 'warning', text: 'the hub is overloaded: it sheds load' }));
  mounted.body.replaceChildren(...rows.slice(start, start + PAGE).map(rowElement));
  mounted.pageInfo.textContent = rows.length
    ? `${start + 1}-${Math.min(start + PAGE, rows.length)} of ${rows.length} (${fleet.rows.size} nodes)`
    : `none of ${fleet.rows.size} nodes`;
  mounted.prev.disabled = view.page === 0;
  mounted.next.disabled = view.page >= pages - 1;
  for (const th of mounted.head.children) {
    th.className = th.getAttribute('data-sort') === view.sort ? (view.descending ? 'sorted down' : 'sorted up') : '';
  }
  renders += 1;
  mounted.root.setAttribute('data-renders', String(renders));
  if (fleet.seq !== null && performance.getEntriesByName('fleet-interactive').length === 0) {
    performance.mark('fleet-interactive'); // bench/dashboard.py reads it
  }
}

// Live updates render at most four times a second (the first after a quiet spell at the next frame); a user's own
// input renders at once.
const RENDER_GAP_MS = 250;
let renderedAt = -Infinity;
export function scheduleRender() {
  if (renderPending || !mounted) return;
  renderPending = true;
  setTimeout(() => requestAnimationFrame(render), Math.max(0, renderedAt + RENDER_GAP_MS - performance.now()));
}

export function showFleet(main) {
  const search = h('input', { type: 'search', placeholder: 'search id, profile, version, reason, label', 'aria-label': 'search' });
  const label = h('input', { type: 'text', placeholder: 'label: key or key=value', 'aria-label': 'label filter' });
  search.value = view.query;
  label.value = view.label;
  search.addEventListener('input', () => { view.query = search.value; view.page = 0; render(); });
  label.addEventListener('input', () => { view.label = label.value; view.page = 0; render(); });
  const head = h('tr', {}, COLUMNS.map(([key, title]) => h('th', {
    'data-sort': key,
    onclick: () => { view.descending = view.sort === key ? !view.descending : false; view.sort = key; render(); },
  }, title)));
  const prev = h('button', { type: 'button', text: 'Previous', onclick: () => { view.page -= 1; render(); } });
  const next = h('button', { type: 'button', text: 'Next', onclick: () => { view.page += 1; render(); } });
  const pageInfo = h('span', { class: 'page-info' });
  const body = h('tbody');
  const countsBox = h('div', { class: 'count-bar' });
  const root = h('section', { id: 'fleet' },
    countsBox, h('div', { class: 'controls' }, search, label, prev, pageInfo, next),
    h('table', { class: 'grid' }, h('thead', {}, head), body));
  main.replaceChildren(root);
  mounted = { root, counts: countsBox, body, head, pageInfo, prev, next };
  render();
  const ticker = setInterval(() => scheduleRender(), 5000); // ages move on
  return () => { mounted = null; clearInterval(ticker); };
}
