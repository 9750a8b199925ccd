// The dashboard: log in, load the fleet, follow the live stream, show the view the address names
// (#/fleet, #/node/ID, #/runs, #/run/ID).

import { ApiError, api, get, setCsrf, whenUnauthorized } from './api.js';
import { applyHub, applyNode, loadFleet, scheduleRender, showFleet } from './fleet.js';
import { connect, disconnect, on } from './live.js';
import { showNode } from './node.js';
import { showRun, showRuns } from './runs.js';

const main = document.getElementById('main');
let session = null;
let leave = () => {};

function route() {
  leave();
  if (!session) return;
  const [, view, ...rest] = (location.hash || '#/fleet').split('/');
  const id = decodeURIComponent(rest.join('/'));
  for (const a of document.querySelectorAll('nav a')) {
    a.className = a.getAttribute('data-view') === (view === 'node' ? 'fleet' : view === 'run' ? 'runs' : view) ? 'active' : '';
  }
  if (view === 'node' && id) leave = showNode(main, session, id);
  else if (view === 'runs') leave = showRuns(main);
  else if (view === 'run' && id) leave = showRun(main, session, id);
  else leave = showFleet(main);
}

function showLogin(text) {
  session = null;
  disconnect();
  leave();
  leave = () => {};
  main.replaceChildren();
  document.getElementById('who').textContent = '';
  document.getElementById('logout').hidden = true;
  document.getElementById('login').hidden = false;
  document.getElementById('login-error').textContent = text || '';
  document.getElementById('token').focus();
}

async function start(who) {
  session = who;
  setCsrf(who.csrf);
  document.getElementById('login').hidden = true;
  document.getElementById('logout').hidden = false;
  document.getElementById('who').textContent = `${who.name} (${who.role}) · fleet ${who.fleet}`;
  const seq = await loadFleet();
  connect(seq);
  route();
}

async function reload() {
  // The hub cannot resume the stream from where this page was: everything again, then resume from there.
  const seq = await loadFleet();
  connect(seq);
  scheduleRender();
}

async function login(event) {
  event.preventDefault();
  const input = document.getElementById('token');
  const token = input.value.trim();
  input.value = '';
  try {
    // The token goes in the Authorization header, as for every API client: never in an address or a form body.
    await api('POST', '/ui/login', undefined, { Authorization: `Bearer ${token}` });
    await start(await get('/ui/session'));
  } catch (error) {
    showLogin(error instanceof ApiError && error.status === 401 ? 'wrong token' : `cannot log in: ${error.message}`);
  }
}

async function logout() {
  try {
    await api('POST', '/ui/logout');
  } finally {
    showLogin('logged out');
  }
}

async function boot() {
  document.getElementById('login-form').addEventListener('submit', login);
  document.getElementById('logout').addEventListener('click', logout);
  window.addEventListener('hashchange', route);
  whenUnauthorized(() => { if (session) showLogin('your session ended: log in again'); });
  on('node', applyNode);
  on('hub', applyHub);
  on('reload', () => { reload(); });
  on('closed', async () => {
    try {
      await get('/ui/session'); // a 401 shows the login form; otherwise the stream reopens by itself
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 401)) console.warn('hub unreachable', error);
    }
  });
  try {
    await start(await get('/ui/session'));
  } catch (error) {
    showLogin(error instanceof ApiError && error.status === 401 ? '' : `cannot reach the hub: ${error.message}`);
  }
}

boot();
