// A line chart of one metric over a time window, drawn as SVG. A missing sample breaks the line.

import { svg } from './dom.js';

const W = 360;
const H = 140;
const LEFT = 40;
const RIGHT = 10;
const TOP = 22;
const BOTTOM = 20;

export function lineChart({ title, unit, times, values, from, to, percent }) {
  const finite = values.filter((v) => typeof v === 'number' && Number.isFinite(v));
  const top = percent ? 100 : Math.max(1, ...finite) * 1.1;
  const bottom = percent ? 0 : Math.min(0, ...finite);
  const x = (t) => LEFT + ((t - from) / Math.max(1, to - from)) * (W - LEFT - RIGHT);
  const y = (v) => TOP + (1 - (v - bottom) / Math.max(1e-9, top - bottom)) * (H - TOP - BOTTOM);
  const segments = [];
  let current = [];
  times.forEach((t, i) => {
    const v = values[i];
    if (typeof v === 'number' && Number.isFinite(v) && t >= from) current.push(`${x(t).toFixed(1)},${y(v).toFixed(1)}`);
    else if (current.length) { segments.push(current); current = []; }
  });
  if (current.length) segments.push(current);
  const last = finite.length ? finite[finite.length - 1] : null;
  const heading = `${title}${last === null ? ': no samples' : `: ${Math.round(last * 10) / 10} ${unit}`}`;
  return svg('svg', { class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': heading, 'data-metric': title },
    svg('text', { x: LEFT, y: 14, class: 'chart-title', text: heading }),
    svg('line', { x1: LEFT, y1: H - BOTTOM, x2: W - RIGHT, y2: H - BOTTOM, class: 'axis' }),
    svg('line', { x1: LEFT, y1: TOP, x2: LEFT, y2: H - BOTTOM, class: 'axis' }),
    svg('text', { x: LEFT - 4, y: TOP + 4, class: 'tick end', text: `${Math.round(top)}` }),
    svg('text', { x: LEFT - 4, y: H - BOTTOM, class: 'tick end', text: `${Math.round(bottom)}` }),
    svg('text', { x: LEFT, y: H - 4, class: 'tick', text: `-${Math.round((to - from) / 60000)} min` }),
    svg('text', { x: W - RIGHT, y: H - 4, class: 'tick end', text: 'now' }),
    segments.map((points) => (points.length === 1
      ? svg('circle', { cx: points[0].split(',')[0], cy: points[0].split(',')[1], r: 2, class: 'dot' })
      : svg('polyline', { points: points.join(' '), class: 'series' }))));
}
