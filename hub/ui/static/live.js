// The live stream (GET /events, Server-Sent Events). The browser reconnects by itself after a cut and sends the
// last id it saw as Last-Event-ID, so the hub replays what changed meanwhile; when the stream is closed for good
// (the hub restarted, a 401) the page opens a new one resuming from the last id it saw. `reload` means the hub can
// no longer resume from there: the page loads its data again.

const listeners = new Map();
let source = null;
let lastId = null;
let reopenTimer = null;

export function on(kind, handler) {
  if (!listeners.has(kind)) listeners.set(kind, new Set());
  listeners.get(kind).add(handler);
  return () => listeners.get(kind).delete(handler);
}

function emit(kind, data) {
  for (const handler of listeners.get(kind) || []) handler(data);
}

function status(text) {
  const el = document.getElementById('live');
  if (!el) return;
  el.textContent = text;
  el.setAttribute('data-state', text);
  if (lastId !== null) el.setAttribute('data-seq', String(lastId));
}

export function connect(after) {
  lastId = after;
  open();
}

export function disconnect() {
  clearTimeout(reopenTimer);
  if (source) source.close();
  source = null;
  status('offline');
}

function open() {
  clearTimeout(reopenTimer);
  if (source) source.close();
  source = new EventSource(lastId === null ? '/events' : `/events?after=${lastId}`);
  const mine = source;
  // Live once `hello` arrives: it follows what the hub replayed, so the page has then caught up.
  mine.addEventListener('open', () => status('catching up'));
  mine.addEventListener('error', () => {
    if (mine !== source) return;
    if (mine.readyState === EventSource.CLOSED) {
      status('offline');
      emit('closed', null);
      reopenTimer = setTimeout(open, 3000);
    } else {
      status('reconnecting');
    }
  });
  for (const kind of ['node', 'run', 'hub', 'hello']) {
    mine.addEventListener(kind, (event) => {
      const data = JSON.parse(event.data);
      emit(kind, data);
      if (event.lastEventId) lastId = Number(event.lastEventId);
      if (kind === 'hello' || event.lastEventId) status('live');
    });
  }
  mine.addEventListener('reload', (event) => {
    mine.close();
    source = null;
    status('reloading');
    emit('reload', JSON.parse(event.data));
  });
}
