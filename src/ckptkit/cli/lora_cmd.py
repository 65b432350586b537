"""``ckpt lora SUBCOMMAND``: what users do with LoRAs."""

from __future__ import annotations

from . import lora_rank_cmd


def add_parser(commands) -> None:
    p = commands.add_parser("lora", help="LoRAs: extract, resize, merge",
                            description="Work with LoRAs and other adapters.")
    sub = p.add_subparsers(dest="lora_command", metavar="SUBCOMMAND",
                           parser_class=type(p))
    sub.required = True
    lora_rank_cmd.add_extract(sub)
    lora_rank_cmd.add_resize(sub)
    lora_rank_cmd.add_merge(sub)
