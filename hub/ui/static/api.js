// The hub's API as the page calls it: the session cookie authenticates (the browser sends it), and every request
// that changes something carries the session's CSRF token.

let csrf = null;
let onUnauthorized = () => {};

export class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === 'string' ? detail : JSON.stringify(detail));
    this.status = status;
  }
}

export function setCsrf(token) {
  csrf = token;
}

export function whenUnauthorized(handler) {
  onUnauthorized = handler;
}

export async function api(method, path, body, headers = {}) {
  const init = { method, credentials: 'same-origin', headers: { Accept: 'application/json', ...headers } };
  if (method !== 'GET' && method !== 'HEAD' && csrf) init.headers['X-CSRF-Token'] = csrf;
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = (response.headers.get('content-type') || '').includes('json') ? await response.json() : null;
  if (response.status === 401 && !headers.Authorization) onUnauthorized();
  if (!response.ok) throw new ApiError(response.status, data && data.detail !== undefined ? data.detail : response.statusText);
  return data;
}

export const get = (path) => api('GET', path);
export const post = (path, body) => api('POST', path, body);
