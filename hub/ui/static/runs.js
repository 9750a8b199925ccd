// Runs: the list with state filters, kept current by the live stream; one run with its graph (dag.js), every
// attempt, and the operator's cancel and force-fail.

import { ApiError, get, post } from './api.js';
import { age, badge, clock, confirmButton, h, link, nodeHash, runHash, syncClock } from './dom.js';
import { drawRun } from './dag.js';
import { on } from './live.js';

const STATES = ['running', 'compensating', 'succeeded', 'failed', 'cancelled', 'timed_out'];
const TERMINAL = new Set(['succeeded', 'failed', 'cancelled', 'timed_out']);
const LIMIT = 500;
let filter = '';

function runRow(run) {
  return h('tr', { 'data-run': run.id },
    h('td', {}, link(runHash(run.id), run.id)), h('td', { text: `${run.workflow} ${run.version}` }),
    h('td', {}, badge(run.state)), h('td', { text: age(run.submitted_at) }), h('td', { text: run.finished_at ? age(run.finished_at) : '-' }),
    h('td', { class: 'reason', text: run.error || '' }));
}

export function showRuns(main) {
  const body = h('tbody');
  const info = h('span', { class: 'page-info' });
  const buttons = h('div', { class: 'counts' });
  const runs = new Map();
  let alive = true;
  const render = () => {
    const shown = [...runs.values()].filter((r) => !filter || r.state === filter)
      .sort((a, b) => (b.submitted_at || 0) - (a.submitted_at || 0)).slice(0, LIMIT);
    body.replaceChildren(...shown.map(runRow));
    info.textContent = `${shown.length} run(s)${filter ? ` ${filter}` : ''}`;
    buttons.replaceChildren(h('span', { class: 'count-title', text: 'state' }), ...['', ...STATES].map((state) => h('button', {
      type: 'button', class: `count ${filter === state ? 'active' : ''}`, 'data-state': state || 'all',
      onclick: () => { filter = state; load(); },
    }, state ? badge(state) : 'all')));
  };
  const load = async () => {
    const list = await get(`/runs?limit=${LIMIT}${filter ? `&state=${encodeURIComponent(filter)}` : ''}`);
    if (!alive) return;
    runs.clear();
    for (const run of list) runs.set(run.id, run);
    render();
  };
  main.replaceChildren(h('section', { id: 'runs' }, h('div', { class: 'controls' }, buttons, info),
    h('table', { class: 'grid' }, h('thead', {}, h('tr', {}, ['Run', 'Workflow', 'State', 'Submitted', 'Finished', 'Error'].map((t) => h('th', { text: t })))), body)));
  load();
  const stop = on('run', (run) => {
    if (run.gone) runs.delete(run.id);
    else runs.set(run.id, { ...(runs.get(run.id) || {}), ...run });
    render();
  });
  const stopReload = on('reload', () => load());
  return () => { alive = false; stop(); stopReload(); };
}

export function showRun(main, session, runId) {
  const header = h('div', { class: 'run-head' });
  const message = h('p', { class: 'message', role: 'status' });
  const graph = h('div', { class: 'graph' });
  const attempts = h('tbody');
  main.replaceChildren(h('section', { id: 'run' }, h('p', {}, link('#/runs', '← runs')), header, message,
    h('h2', { text: 'Steps' }), graph, h('h2', { text: 'Attempts' }),
    h('table', { class: 'grid' }, h('thead', {}, h('tr', {}, ['Step', 'Attempt', 'Node', 'Fence', 'State', 'Reason', 'Assigned', 'Ended'].map((t) => h('th', { text: t })))), attempts)));
  const say = (text, bad = false) => { message.textContent = text; message.className = bad ? 'message error' : 'message'; };
  let alive = true;
  const act = async (verb, done) => {
    try {
      await post(`/runs/${encodeURIComponent(runId)}/${verb}`, { reason: `${done} from the dashboard by ${session.name}` });
      say(done);
    } catch (error) {
      say(error instanceof ApiError ? `refused: ${error.message}` : String(error), true);
    }
    refresh();
  };
  const refresh = async () => {
    let page;
    try {
      page = await get(`/ui/runs/${encodeURIComponent(runId)}`);
    } catch (error) {
      say(error instanceof ApiError && error.status === 404 ? `no run ${runId}` : String(error), true);
      return;
    }
    if (!alive) return;
    syncClock(page.now);
    const run = page.run;
    const operator = session.role === 'operator' || session.role === 'admin';
    header.replaceChildren(h('h1', { text: run.id }),
      h('dl', { class: 'facts' },
        h('dt', { text: 'Workflow' }), h('dd', { text: `${run.workflow} ${run.version}` }),
        h('dt', { text: 'State' }), h('dd', { id: 'run-state' }, badge(run.state), run.error ? ` ${run.error}` : ''),
        h('dt', { text: 'Submitted' }), h('dd', { text: clock(run.submitted_at) }),
        h('dt', { text: 'Finished' }), h('dd', { text: clock(run.finished_at) }),
        h('dt', { text: 'Moved by adaptation' }), h('dd', { text: `${run.migrations || 0} step(s)` })),
      h('div', { class: 'actions' }, operator && !TERMINAL.has(run.state) ? [
        confirmButton('Cancel', 'Really cancel this run?', () => act('cancel', 'cancelled')),
        confirmButton('Force-fail', 'Really fail this run?', () => act('fail', 'failed'))] : null));
    graph.replaceChildren(run.archived ? h('p', { text: 'archived: the hub keeps only the summary of this run' }) : drawRun(run));
    attempts.replaceChildren(...(run.steps || []).flatMap((step) => step.attempts.map((a, i) => h('tr', {},
      h('td', { text: step.id }), h('td', { text: String(i + 1) }), h('td', {}, link(nodeHash(a.node), a.node)),
      h('td', { text: String(a.fence) }), h('td', {}, badge(a.state)), h('td', { class: 'reason', text: a.reason || '' }),
      h('td', { text: clock(a.assigned_at) }), h('td', { text: clock(a.ended_at) })))));
  };
  refresh();
  const stop = on('run', (run) => { if (run.id === runId) refresh(); });
  const stopReload = on('reload', () => refresh());
  return () => { alive = false; stop(); stopReload(); };
}
