"""Which products each chapter builds or uses, and the order ``tdpo-lab reproduce`` may run them in.

``CHAPTERS`` says which products each notebook builds or uses (a product is a cache stage of
:mod:`tdpo_lab.cache.plan` or ``"run:<method>"``); :func:`chapter_needs` derives from it which chapters may
run side by side.
"""

from __future__ import annotations

import dataclasses

from tdpo_lab.cache.plan import run_inputs, stage


@dataclasses.dataclass(frozen=True)
class Chapter:
    """What a notebook's cells build and use. A product is a stage name or ``"run:<method>"``.

    ``builds``: products it builds itself (their inputs it waits for). ``uses``: products of earlier
    chapters it needs from its first cells. ``compares``: runs it trains, if missing, only in its last
    cells, to compare with: the run folder's lock is enough there, so it does not wait for them.
    ``after``: a scheduling choice with no product behind it.
    """

    builds: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    compares: tuple[str, ...] = ()
    after: tuple[str, ...] = ()


CHAPTERS: dict[str, Chapter] = {
    "00": Chapter(builds=("train_data", "test_data", "tokenizer", "reward")),
    "01": Chapter(builds=("sft",)),
    "02": Chapter(builds=("pairs",)),
    "03": Chapter(),  # tensors only
    "04": Chapter(builds=("eval_ref", "run:dpo")),
    "05": Chapter(builds=("eval_ref", "run:tdpo1", "run:tdpo2"), uses=("run:dpo",)),
    "06": Chapter(builds=("eval_ref", "run:tidpo"), compares=("run:dpo",)),
    # 04-05 and 06-07 are two lanes of two chapters: with --jobs 2 they run side by side
    "07": Chapter(builds=("attnpo", "eval_ref", "run:attnpo"), compares=("run:dpo",), after=("06",)),
    "08": Chapter(uses=("run:dpo", "run:tdpo1", "run:tdpo2", "run:tidpo", "run:attnpo")),
}


def _inputs(product: str) -> tuple[str, ...]:
    if product.startswith("run:"):
        return run_inputs(product.removeprefix("run:"))
    try:
        return stage(product).upstream
    except KeyError:  # a data source: nothing upstream
        return ()


def chapter_needs(chapters: dict[str, Chapter] | None = None) -> dict[str, tuple[str, ...]]:
    """Which earlier chapters each chapter waits for, derived from ``CHAPTERS``.

    A chapter waits for the first chapter that builds each product it uses or that its own products are
    built from (all the way upstream), plus its ``after``; a chapter already implied by another is
    dropped. Gives the table ``tdpo-lab reproduce`` schedules by.
    """
    chapters = CHAPTERS if chapters is None else chapters
    order = sorted(chapters)
    owner: dict[str, str] = {}
    for name in order:
        for product in chapters[name].builds:
            owner.setdefault(product, name)
    needs: dict[str, tuple[str, ...]] = {}
    ancestors: dict[str, set[str]] = {}
    for name in order:
        chapter = chapters[name]
        wanted, stack = set(chapter.uses), [*chapter.builds, *chapter.uses]
        while stack:  # everything upstream of what it builds or uses
            for up in _inputs(stack.pop()):
                if up not in wanted:
                    wanted.add(up)
                    stack.append(up)
        wanted -= set(chapter.builds) | set(chapter.compares)
        direct = {owner[p] for p in wanted if p in owner and owner[p] < name} | set(chapter.after)
        ancestors[name] = direct.union(*(ancestors[d] for d in direct))
        implied = set().union(*(ancestors[d] for d in direct))
        needs[name] = tuple(sorted(direct - implied))
    return needs
