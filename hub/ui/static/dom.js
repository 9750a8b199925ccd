// Building the page. Everything shown is set as text (textContent, text nodes), never parsed as HTML: labels,
// reasons and outputs come from devices. Attributes are set one by one with setAttribute.

const SVG = 'http://www.w3.org/2000/svg';

function build(el, props, children) {
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'text') el.textContent = String(value);
    else if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child !== undefined && child !== null && child !== false) el.append(child); // a string becomes a text node
  }
  return el;
}

export function h(tag, props, ...children) {
  return build(document.createElement(tag), props, children);
}

export function svg(tag, props, ...children) {
  return build(document.createElementNS(SVG, tag), props, children);
}

// The server's clock minus ours, so ages shown are the hub's.
let skew = 0;
export function syncClock(serverNow) {
  if (typeof serverNow === 'number') skew = serverNow - Date.now();
}
export function now() {
  return Date.now() + skew;
}

export function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

export function age(ms) {
  return ms ? `${duration((now() - ms) / 1000)} ago` : '-';
}

export function clock(ms) {
  return ms ? new Date(ms).toLocaleString() : '-';
}

// Class names come from a fixed list: a state the page does not know is shown, but styled as unknown.
const STATES = new Set(['online', 'suspected', 'failed', 'offline', 'healthy', 'degraded', 'unhealthy',
  'running', 'compensating', 'succeeded', 'cancelled', 'timed_out', 'pending', 'queued', 'placed', 'skipped',
  'assigned', 'accepted', 'lost', 'refused', 'unknown']);
export function stateClass(state) {
  return `st-${STATES.has(state) ? state : 'unknown'}`;
}

export function badge(state) {
  return h('span', { class: `badge ${stateClass(state)}`, text: state || 'unknown' });
}

export function labelText(labels) {
  return Object.entries(labels || {}).map(([k, v]) => `${k}=${v}`).join(', ');
}

export function link(hash, text) {
  return h('a', { href: hash, text });
}

export const nodeHash = (id) => `#/node/${encodeURIComponent(id)}`;
export const runHash = (id) => `#/run/${encodeURIComponent(id)}`;

// An action that needs a second click ("Revoke" then "Really revoke n1?"): no browser dialogs.
export function confirmButton(label, question, action) {
  const box = h('span', { class: 'confirm' });
  const ask = h('button', { type: 'button', text: label });
  ask.addEventListener('click', () => {
    const yes = h('button', { type: 'button', class: 'danger', text: question });
    const no = h('button', { type: 'button', text: 'Keep' });
    yes.addEventListener('click', async () => { box.replaceChildren(ask); await action(); });
    no.addEventListener('click', () => box.replaceChildren(ask));
    box.replaceChildren(yes, no);
  });
  box.append(ask);
  return box;
}
