"""Padded tokens and batches of the shipped evaluation under three batchings, from the prompts' token lengths alone
(no model runs): every prompt of a task sorted by length across all instruction sets (the evaluation until
RESULTS §25), batches cut within each instruction set (the evaluation since: a set's scores do not depend on which
other sets run), or within each (set, instruction) group.

    PYTHONPATH=src:. python results/study-draws-robust/batch_padding.py
"""

from coin.config import load_settings
from coin.data.prompts import encode
from coin.data.tasks import get_task
from coin.evaluation.instructions import load_instruction_sets
from coin.evaluation.sampling import SplitUnavailable, sample_examples
from coin.modeling.backbone import load_tokenizer
from coin.predict import join_instruction


def padded(lengths: list[int], b: int) -> int:
    return sum(max(lengths[i:i + b]) * len(lengths[i:i + b]) for i in range(0, len(lengths), b))


def main() -> None:
    s = load_settings("params.yaml", [])
    cfg, tok, b = s.evaluate, load_tokenizer(), s.evaluate.batch_size
    sets = load_instruction_sets(cfg.instruction_file, cfg.instruction_sets, cfg.tasks)
    tot = dict.fromkeys(("real", "across sets", "per set", "per instruction", "batches across", "batches per set",
                         "batches per instruction"), 0)
    for task in cfg.tasks:
        try:
            rows, _ = sample_examples(s.paths.data_dir, task, cfg.samples_per_task, s.seed)
        except SplitUnavailable:
            continue  # qqp: no validation split offline, not evaluated
        spec = get_task(task)

        def length(instr: str, row: dict) -> int:
            text = join_instruction(instr, spec.render_content(row))  # noqa: B023 (called inside this iteration)
            return len(encode(tok, text, "", fmt=cfg.prompt_format, append_eos=False).input_ids)

        by_set = {st: [sorted((length(instr, r) for r in rows), reverse=True) for instr in sets[st][task]]
                  for st in cfg.instruction_sets}
        groups = [g for gs in by_set.values() for g in gs]
        every = sorted((n for g in groups for n in g), reverse=True)
        per_set = [sorted((n for g in gs for n in g), reverse=True) for gs in by_set.values()]
        tot["per set"] += sum(padded(g, b) for g in per_set)
        tot["batches per set"] += sum(-(-len(g) // b) for g in per_set)
        tot["real"] += sum(every)
        tot["across sets"] += padded(every, b)
        tot["per instruction"] += sum(padded(g, b) for g in groups)
        tot["batches across"] += -(-len(every) // b)
        tot["batches per instruction"] += sum(-(-len(g) // b) for g in groups)
    print(tot)
    print(f"per set / across sets: padded tokens x{tot['per set'] / tot['across sets']:.3f}, "
          f"batches x{tot['batches per set'] / tot['batches across']:.3f}")
    print(f"per instruction / across sets: padded tokens x{tot['per instruction'] / tot['across sets']:.3f}, "
          f"batches x{tot['batches per instruction'] / tot['batches across']:.3f}")


if __name__ == "__main__":
    main()
