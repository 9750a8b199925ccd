// One node: liveness and health with their reasons, telemetry charts over the last hour, history, attempts, and
// the operator's actions (drain, undrain; revoke for admins).

import { ApiError, get, post } from './api.js';
import { badge, clock, age, confirmButton, h, labelText, link, runHash, syncClock, now } from './dom.js';
import { lineChart } from './chart.js';
import { on } from './live.js';

const CHARTS = [['cpu', 'CPU', '%', true], ['mem', 'Memory', '%', true], ['disk', 'Disk', '%', true],
  ['temp', 'Temperature', '°C', false]];
const TELEMETRY_EVERY_MS = 15000; // telemetry is not on the live stream (it is not journaled): asked for

function historyText(entry) {
  if (entry.kind === 'liveness') return [entry.state, entry.reason];
  if (entry.kind === 'health') return [entry.health, `${entry.metric} ${entry.value} (threshold ${entry.threshold}): ${entry.reason || ''}`];
  if (entry.kind === 'action') return [entry.action, entry.reason];
  if (entry.kind === 'breaker') return [`breaker ${entry.state}`, entry.reason];
  if (entry.kind === 'conflict') return [entry.conflict ? 'conflict' : 'conflict cleared', entry.reason];
  return [entry.kind, JSON.stringify(entry)];
}

function actions(session, node, refresh, say) {
  const box = h('div', { class: 'actions' });
  const operator = session.role === 'operator' || session.role === 'admin';
  if (!operator) return box;
  const act = async (path, body, done) => {
    try {
      await post(path, body);
      say(done);
    } catch (error) {
      say(error instanceof ApiError ? `refused: ${error.message}` : String(error), true);
    }
    refresh();
  };
  const path = `/nodes/${encodeURIComponent(node.id)}`;
  if (node.draining) box.append(h('button', { type: 'button', id: 'undrain', text: 'Undrain', onclick: () => act(`${path}/drain`, { on: false }, 'undrained') }));
  else box.append(h('button', { type: 'button', id: 'drain', text: 'Drain', onclick: () => act(`${path}/drain`, { on: true }, 'draining: no new work') }));
  if (session.role === 'admin' && node.enrollment !== 'revoked') {
    box.append(confirmButton('Revoke', `Really revoke ${node.id}?`, () => act(`${path}/revoke`, undefined, 'revoked')));
  }
  return box;
}

export function showNode(main, session, nodeId) {
  const header = h('div', { class: 'node-head' });
  const message = h('p', { class: 'message', role: 'status' });
  const charts = h('div', { class: 'charts' });
  const history = h('tbody');
  const attempts = h('tbody');
  main.replaceChildren(h('section', { id: 'node' },
    h('p', {}, link('#/fleet', '← fleet')), header, message,
    h('h2', { text: 'Telemetry, last hour' }), charts,
    h('div', { class: 'columns' },
      h('div', {}, h('h2', { text: 'Liveness and health history' }),
        h('table', { class: 'grid' }, h('thead', {}, h('tr', {}, h('th', { text: 'When' }), h('th', { text: 'What' }), h('th', { text: 'Why' }))), history)),
      h('div', {}, h('h2', { text: 'Attempts on this node' }),
        h('table', { class: 'grid' }, h('thead', {}, h('tr', {}, ['Run', 'Step', 'Fence', 'State', 'Reason', 'Assigned'].map((t) => h('th', { text: t })))), attempts)))));
  const say = (text, bad = false) => { message.textContent = text; message.className = bad ? 'message error' : 'message'; };
  let alive = true;

  const refresh = async () => {
    let page;
    try {
      page = await get(`/ui/nodes/${encodeURIComponent(nodeId)}`);
    } catch (error) {
      say(error instanceof ApiError && error.status === 404 ? `no node ${nodeId}` : String(error), true);
      return;
    }
    if (!alive) return;
    syncClock(page.now);
    const node = page.node;
    const row = page.row || {};
    const cause = row.health_cause;
    header.replaceChildren(
      h('h1', { text: node.id }),
      h('dl', { class: 'facts' },
        h('dt', { text: 'Liveness' }), h('dd', { id: 'node-liveness' }, badge(node.liveness), ' ', row.liveness_reason || '', row.changed_at ? ` (${age(row.changed_at)})` : ''),
        h('dt', { text: 'Health' }), h('dd', { id: 'node-health' }, badge(node.health), ' ', cause ? `${cause.metric}: ${cause.reason}` : ''),
        h('dt', { text: 'Enrollment' }), h('dd', { text: node.enrollment }),
        h('dt', { text: 'Profile' }), h('dd', { text: node.profile || '-' }),
        h('dt', { text: 'Agent version' }), h('dd', { text: row.version || '-' }),
        h('dt', { text: 'Last seen' }), h('dd', { text: node.last_seen ? `${clock(node.last_seen)} (${age(node.last_seen)})` : '-' }),
        h('dt', { text: 'Labels' }), h('dd', { id: 'node-labels', text: labelText(node.labels) || '-' }),
        h('dt', { text: 'State' }), h('dd', { id: 'node-flags', text: [node.draining ? 'draining' : 'accepting work', node.throttled && 'throttled', node.breaker && `breaker ${node.breaker}`].filter(Boolean).join(', ') }),
        h('dt', { text: 'Running' }), h('dd', {}, (row.running || []).length ? row.running.map((r) => h('div', {}, link(runHash(r.split('/')[0]), r))) : '-')),
      actions(session, node, refresh, say));
    const t = page.telemetry;
    const to = now();
    charts.replaceChildren(...CHARTS.map(([metric, title, unit, percent]) => lineChart({
      title, unit, percent, times: t.at, values: t[metric] || [], from: to - t.window_ms, to,
    })));
    history.replaceChildren(...(node.history || []).slice().reverse().map((entry) => {
      const [what, why] = historyText(entry);
      return h('tr', {}, h('td', { text: clock(entry.at) }), h('td', {}, badge(what)), h('td', { text: why || '' }));
    }));
    attempts.replaceChildren(...page.attempts.map((a) => h('tr', {},
      h('td', {}, link(runHash(a.run), a.run)), h('td', { text: a.step }), h('td', { text: String(a.fence) }),
      h('td', {}, badge(a.state)), h('td', { text: a.reason || '' }), h('td', { text: clock(a.assigned_at) }))));
  };

  refresh();
  const stop = on('node', (row) => { if (row.id === nodeId) refresh(); });
  const stopReload = on('reload', () => refresh());
  const ticker = setInterval(refresh, TELEMETRY_EVERY_MS);
  return () => { alive = false; stop(); stopReload(); clearInterval(ticker); };
}
