"""Enroll requests from the wire, and operator actions on nodes behind the hub's API: accept (one node, or every
pending request), reject, revoke, drain, add (pre-register, or re-key a revoked node), delete.

The registry (hub/registry.py) holds the rules; this applies their effects to the running hub: the keys its receiver
trusts, the replay state a new key resets, the node's record in the core, and the answer an agent waits for.

Re-keying: `nodes revoke ID`, a new key on the device, `nodes add ID NEWKEY`. The device behind the new key may be a
fresh install whose boot counter starts again at 1, which the replay window kept for the old key would refuse for
ever; so a key the replay state was not built with gets a fresh window, made durable before the key is trusted. The
same key coming back (delete, then accept it again) keeps its window: whatever was captured under it stays refused.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.runtime.logs import ThrottledLog
from protocols import HUB_ID, Ack, Drain, Enroll, ProtocolError, ReplayWindow, kid_for

from .errors import Conflict, NotFound, Unprocessable
from .events import NodeDrainSet, NodeRemoved
from .journal import Journal
from .protocol import EnrollRequest
from .registry import Enrollment, Registry
from .transitions import REACHABLE

if TYPE_CHECKING:
    from .service import Hub

log = logging.getLogger("fleetflow.hub")


def reset_stale_windows(registry: Registry, journal: Journal, windows: dict[str, ReplayWindow]) -> None:
    """At start: an id accepted with a key its replay state was not reset for (the hub stopped between an operator's
    add and the reset) gets its fresh window now."""
    for node_id in registry.stale_replay():
        windows[node_id] = ReplayWindow()
        journal.append_now([], {node_id: windows[node_id].mark()})
        registry.trusted(node_id)
    registry.flush()


class NodeAdmin:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.log = ThrottledLog(log, clock=lambda: hub.clock() / 1000)  # enrollment mischief, paced by the hub's clock

    def trust(self, node_id: str, key: bytes) -> bool:
        """Trust a node's accepted key (the registry holds it). True if the node's replay window was reset for it
        (a new key): the caller makes the fresh mark durable before anything the node sends is acted on."""
        hub = self.hub
        fresh = hub.registry.fresh_key(node_id)
        if fresh:
            log.info("node %s: new key kid %s, so its replay state starts afresh (its boots may count from 1 again)",
                     node_id, kid_for(key).hex())
        hub.registry.trusted(node_id)
        hub.protocol.trust(node_id, key, fresh)
        return fresh

    def enroll(self, node: str, body: Enroll, at: int, replies: list[tuple[str, Any]],
               senders: set[str] | None = None) -> None:
        """An enroll request (its token proof judged by the hub's protocol object), decided and answered."""
        self.answer(self.hub.protocol.enroll_request(node, body, at), replies, senders)

    def answer(self, request: EnrollRequest, replies: list[tuple[str, Any]], senders: set[str] | None = None) -> None:
        """The registry applies the rules and records the verdict (hub/registry.py); this trusts an accepted key,
        reports, and queues the answer. `senders`: the batch's senders whose replay marks it journals (a new key adds
        its fresh one)."""
        hub, node, body = self.hub, request.node, request.body
        outcome = hub.registry.request(node, body.key, body.profile, dict(body.labels), request.at, request.policy,
                                       request.proof)
        hub.metrics.enrollments.labels(outcome.verdict).inc()
        self._report(node, outcome)
        hub.broker_clients.enroll_answered(node, outcome.verdict, outcome.kid, body.broker_password)
        answer = hub.protocol.answer_enroll(request, outcome)
        if answer.trust and self.trust(node, body.key) and senders is not None:
            senders.add(node)  # its fresh replay mark is journaled with this batch, before the answer goes out
        if answer.reply is not None:
            replies.append(answer.reply)

    def _report(self, node: str, outcome: Enrollment) -> None:
        config, warn = self.hub.config, self.log.warning
        for dropped in outcome.dropped:
            self.hub.metrics.enroll_dropped.inc()
            warn("dropped", f"pending enroll requests are capped at {config.max_pending}: dropped the oldest, "
                            f"from node {dropped} (it is listed again when it asks again)")
        if outcome.verdict == "reserved":
            warn("reserved", f"refused an enroll request from node id {HUB_ID!r} (kid {outcome.kid}): that id is the "
                             f"hub's own")
            return
        if outcome.replaced_kid:
            warn("key-changed", f"node {node}: its pending enroll request changed keys, kid {outcome.replaced_kid} -> "
                                f"{outcome.kid}; the request starts over and an accept of the old kid is refused")
        if outcome.token == "bad":
            warn("bad-proof", f"node {node}: its enroll token proof does not verify (a wrong token, or a proof copied "
                              f"from another request); the token admits nothing")
        elif outcome.token == "spent":
            warn("token-spent", f"node {node}: the enroll token has admitted the {config.enroll_token_uses} "
                                f"enrollment(s) it may (--enroll-token-uses); left pending")
        if outcome.verdict == "taken":
            warn("taken", f"node {node}: enroll refused, the id is taken: it is enrolled with kid "
                          f"{outcome.enrolled_kid}, this request has kid {outcome.kid}")
        elif outcome.verdict == "accepted" and outcome.admitted_by == "token":
            log.info("node %s enrolled with the enroll token (kid %s; use %d of %d)", node, outcome.kid,
                     outcome.token_uses, config.enroll_token_uses)
        elif outcome.verdict == "accepted" and outcome.admitted_by == "auto":
            log.info("node %s enrolled by auto-accept (kid %s)", node, outcome.kid)
        elif outcome.verdict == "pending" and outcome.new:
            # A command that runs as printed on this machine: --data finds this hub's API and token.
            log.info("node %s asks to enroll with kid %s; compare it with the kid the agent logs on the device, then "
                     "accept with: fleetflow nodes accept %s --kid %s --data %s", node, outcome.kid, node, outcome.kid,
                     shlex.quote(str(Path(config.data).resolve())))

    async def _trust_now(self, node_id: str, doc: dict[str, Any], why: str, answer: bool = True) -> None:
        """An operator's accept or add: durable fresh window (if the key is new), trust, and (an accept) answer the
        request the node is waiting on. An add answers nothing: no request of that key may be waiting, and the node
        hears `accepted` when it next asks or simply sends."""
        hub = self.hub
        key = bytes.fromhex(doc["key"])
        if hub.registry.fresh_key(node_id):
            await hub.journal.append([], {node_id: ReplayWindow().mark()})
        self.trust(node_id, key)
        hub.registry.flush()
        hub.broker_clients.accepted(node_id, doc["kid"])
        log.info("node %s %s (kid %s)", node_id, why, doc["kid"])
        if answer:
            await hub._command(node_id, Ack((), "accepted", kid_for(key)))

    async def action(self, node_id: str, action: str, on: bool = True, kid: str | None = None) -> dict[str, Any]:
        """`accept` needs `kid`: the fingerprint of the key the operator reviewed (or that key in hex), so a request
        whose key changed after the review is not accepted with the new key."""
        hub, at = self.hub, self.hub.clock()
        if action == "drain":
            if node_id not in hub.core.nodes:
                raise NotFound(f"no node {node_id!r} has announced itself")
            await hub.request([NodeDrainSet(at, node_id, on)])
            await hub._command(node_id, Drain(on))
            return {"id": node_id, "draining": on}
        if action == "accept":
            if not kid:
                raise Unprocessable("name the key you reviewed: its kid (nodes show ID prints it)")
            doc = hub.registry.accept(node_id, kid, at)
        else:
            doc = hub.registry.set_state(node_id, {"reject": "rejected", "revoke": "revoked"}[action], at)
        if doc["state"] == "accepted":
            await self._trust_now(node_id, doc, "accepted by an operator")
        else:
            log.warning("node %s %s by an operator (kid %s): its messages are refused from now on", node_id,
                        doc["state"], doc.get("kid", "-"))
            hub.protocol.distrust(node_id)
            hub.broker_clients.revoked(node_id)
            if node_id in hub.core.nodes:
                await hub.request([NodeRemoved(at, node_id, f"{doc['state']} by an operator")])
        return doc

    async def accept_all(self) -> list[dict[str, Any]]:
        """Accept every pending request, each with the key it asks with at this moment (all in one registry write,
        so no request can change keys in between). Rejected and revoked nodes are not pending: never accepted."""
        accepted = self.hub.registry.accept_pending(self.hub.clock())
        for doc in accepted:
            await self._trust_now(doc["id"], doc, "accepted by an operator (nodes accept --all)")
        return accepted

    async def add(self, node_id: str, key: bytes) -> dict[str, Any]:
        try:
            doc = self.hub.registry.add(node_id, key, self.hub.clock())
        except ProtocolError as exc:  # an id that cannot be a topic level
            raise Unprocessable(str(exc)) from None
        await self._trust_now(node_id, doc, "added by an operator: accepted when it asks or sends", answer=False)
        return doc

    async def delete(self, node_id: str, force: bool) -> dict[str, Any]:
        """Forget a node: its enrollment, its key, its record in the core. Refused while it is online or suspected
        unless forced: its agent would go on running, every message refused, until someone stops it."""
        hub = self.hub
        doc, known = hub.registry.get(node_id), hub.core.nodes.get(node_id)
        if doc is None and known is None:
            raise NotFound(f"no node {node_id!r} is enrolled or known")
        if known is not None and known.state in REACHABLE and not force:
            raise Conflict(f"node {node_id} is {known.state}: stop its agent first, or delete it with --force "
                           f"(its messages are refused from then on and its work moves)")
        hub.protocol.distrust(node_id)
        hub.broker_clients.deleted(node_id)
        if doc is not None:
            hub.registry.delete(node_id)
        if known is not None:
            await hub.request([NodeRemoved(hub.clock(), node_id, "deleted by an operator", forget=True)])
        hub.protocol.forget(node_id)
        log.info("node %s deleted by an operator%s", node_id, f" (kid {doc['kid']})" if doc else "")
        return {"id": node_id, "state": "deleted", "kid": doc["kid"] if doc else None}
