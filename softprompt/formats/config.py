"""`ComposeConfig`, the options of `softprompt compose` (torch-free, so `softprompt --help` loads no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from softprompt.options import check_options, option


@dataclass
class ComposeConfig:
    """What `softprompt compose` composes (formats/compose.py) and where it writes the result."""

    out: str = option(help="folder to write (a PEFT CARTRIDGE adapter; replaced if it exists)", metavar="DIR")
    parts: list = option(
        help="two or more prefix or cartridge adapter folders, in order (their keys/values are concatenated)",
        factory=list,
        positional=True,
        many="+",
        metavar="DIR",
    )

    def __post_init__(self) -> None:
        check_options(self)
        if len(self.parts) < 2:
            raise ValueError(f"compose two or more adapter folders, got {len(self.parts)}")
