"""Per-sender anti-replay: a boot counter plus an IPsec-style sliding window of sequence numbers (RFC 4303 3.4.3).

A newer boot resets the window. Within a boot, a seq above the highest seen slides the window; a seq inside the
window is accepted once (one bit per seq); a seq older than the window is refused. The death certificate is signed
before its session starts, so it carries seq 0: it is accepted once, and only for the sender's current boot.
The state is a small dict of plain values (the bitmap as `size / 8` big-endian bytes, never an integer that would
need a CBOR bignum tag our own profile refuses), so what a receiver writes it can read back with the same codec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from .errors import Replayed

DEFAULT_WINDOW: Final = 256


@dataclass(slots=True)
class ReplayWindow:
    boot: int = -1
    top: int = 0
    bitmap: int = 0  # bit i set = seq (top - i) seen
    death_seen: bool = False
    size: int = DEFAULT_WINDOW

    def check(self, boot: int, seq: int) -> None:
        """Raise `Replayed` if (boot, seq) must be refused. Does not change the window."""
        if boot < self.boot:
            raise Replayed(f"boot {boot} is older than the current boot {self.boot}")
        if boot > self.boot:
            return
        if seq > self.top:
            return
        offset = self.top - seq
        if offset >= self.size:
            raise Replayed(f"seq {seq} of boot {boot} is older than the window (highest seen {self.top})")
        if self.bitmap >> offset & 1:
            raise Replayed(f"seq {seq} of boot {boot} was already received")

    def accept(self, boot: int, seq: int) -> None:
        """Check, then record (boot, seq). seq 0 is never a live message: see `accept_death`."""
        if seq == 0:
            raise Replayed("seq 0 is reserved for the death certificate")
        self.check(boot, seq)
        if boot > self.boot:
            self.boot, self.top, self.bitmap, self.death_seen = boot, seq, 1, False
        elif seq > self.top:
            shift = seq - self.top
            # A jump past the whole window leaves only the new seq: shifting by it could ask for 2**62 bits.
            self.bitmap = ((self.bitmap << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            self.top = seq
        else:
            self.bitmap |= 1 << (self.top - seq)

    def accept_death(self, boot: int) -> None:
        """A death certificate counts once, for the current boot only."""
        if boot != self.boot:
            raise Replayed(f"death certificate for boot {boot}, but the current boot is {self.boot}")
        if self.death_seen:
            raise Replayed(f"death certificate for boot {boot} was already received")
        self.death_seen = True

    def to_dict(self) -> dict[str, Any]:
        return {"boot": self.boot, "top": self.top, "bitmap": self.bitmap.to_bytes(self.size // 8, "big"),
                "death_seen": self.death_seen, "size": self.size}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReplayWindow:
        """Reads both forms: the bitmap as bytes, and as the integer earlier versions wrote."""
        bitmap = data["bitmap"]
        size = int(data.get("size", DEFAULT_WINDOW))
        if size <= 0 or size % 8:
            raise ValueError(f"replay window size {size} is not a positive multiple of 8")
        value = int.from_bytes(bitmap, "big") if isinstance(bitmap, (bytes, bytearray)) else int(bitmap)
        return cls(int(data["boot"]), int(data["top"]), value & ((1 << size) - 1), bool(data["death_seen"]), size)

    @classmethod
    def fenced(cls, boot: int, top: int, death_seen: bool = False, size: int = DEFAULT_WINDOW) -> ReplayWindow:
        """A window that knows only a high-water mark: it refuses every seq at or below `top` of `boot` (as if all
        were seen) and every older boot. What a receiver restores when the full window was not kept or is lost."""
        return cls(boot, top, (1 << size) - 1, death_seen, size)

    def mark(self) -> tuple[int, int, bool]:
        """The high-water mark: (boot, highest seq accepted in it, death certificate seen)."""
        return self.boot, self.top, self.death_seen
