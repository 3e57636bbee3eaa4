"""Print the three graphs' I/O tables for a config (README's tables come from here).

    python -m avg_edge.export.iotable            # the released AVG-LLaVA-7B config, fp16
    python -m avg_edge.export.iotable -m CKPT --precision fp32
    python -m avg_edge.export.iotable --points   # validation points: the demo model vs 7B
"""

from __future__ import annotations

import argparse
from pathlib import Path

from avg_edge.specs import markdown_io_table


def tables(config, precision: str = "fp16") -> str:
    from avg_edge.export.exporter import bounds_for, graph_specs

    specs = graph_specs(config, bounds_for(config, None, None), precision)
    layers = config.text.num_hidden_layers
    out = []
    for name, spec in specs.items():
        title = f"`{spec.file}`" + (f" ({layers} layers: `{{i}}` = 0..{layers - 1})" if name == "decoder" else "")
        out.append(f"#### {title}\n\n{markdown_io_table(spec)}")
    return "\n".join(out)


def points_table(configs: dict[str, object]) -> str:
    """Each graph's validation points (axis sizes) for each config, side by side."""
    from avg_edge import specs as S
    from avg_edge import validation as V
    from avg_edge.export.exporter import bounds_for, graph_specs

    per = {}
    for label, config in configs.items():
        specs = graph_specs(config, bounds_for(config, None, None), "fp16")
        heads = config.text.num_attention_heads
        per[label] = {(n, p.name): p for n, s in specs.items()
                      for p in V.validation_points(s, heads if n == S.DECODER else None)}
    rows = ["| graph | point | " + " | ".join(configs) + " |", "|---|---|" + "---|" * len(configs)]
    for graph, point in next(iter(per.values())):
        cells = []
        for label in configs:
            p = per[label][(graph, point)]
            cells.append(", ".join(f"{k} {v}" for k, v in p.sizes.items() if k not in S.DERIVED_AXES)
                         + (" (capped)" if p.note else ""))
        rows.append(f"| {graph} | {point} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    from avg_edge.model.config import AVG_LLAVA_7B_CONFIG, AvgLlavaConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", type=Path)
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--points", action="store_true", help="the validation points of the demo model and of 7B")
    a = ap.parse_args()
    if a.points:
        from avg_edge.model.demo import CHECKPOINT

        print(points_table({"demo model (4 heads)": AvgLlavaConfig.from_folder(CHECKPOINT),
                            "AVG-LLaVA-7B (32 heads)": AvgLlavaConfig.from_dict(AVG_LLAVA_7B_CONFIG)}))
        return
    config = AvgLlavaConfig.from_folder(a.model) if a.model else AvgLlavaConfig.from_dict(AVG_LLAVA_7B_CONFIG)
    print(tables(config, a.precision))


if __name__ == "__main__":
    main()
