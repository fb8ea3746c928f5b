"""Caption prompts: the PixArt-α presets, or free text with an optional ``{alt_text}`` placeholder."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

ALT_TEXT_FIELD = "{alt_text}"
PRESETS: dict[str, str] = {
    # The paper's prompt (PixArt-α, section 2.4).
    "pixart": "Describe this image and its style in a very detailed manner",
    # The public code's prompt, which conditions on the alt text (temperature 0.2 there).
    "pixart-alt": f'Given the caption of this image "{ALT_TEXT_FIELD}", describe this image in a very detailed manner',
}
FALLBACK = "pixart"


@dataclass(frozen=True)
class Prompt:
    """A prompt template and the id recorded with each caption."""

    id: str
    template: str

    @classmethod
    def parse(cls, spec: str) -> Prompt:
        """A preset name, or free text (id ``custom-<hash>``)."""
        if spec in PRESETS:
            return cls(spec, PRESETS[spec])
        return cls(f"custom-{hashlib.sha1(spec.encode()).hexdigest()[:8]}", spec)

    def render(self, alt_text: str | None) -> tuple[str, str]:
        """``(prompt id, prompt text)`` for one sample; no alt text falls back to the ``pixart`` preset."""
        if ALT_TEXT_FIELD not in self.template:
            return self.id, self.template
        alt = (alt_text or "").strip()
        if not alt:
            return FALLBACK, PRESETS[FALLBACK]
        return self.id, self.template.replace(ALT_TEXT_FIELD, alt)
