"""Print the three graphs' I/O tables for a config (README's tables come from here).

    python -m avg_edge.export.iotable            # the released AVG-LLaVA-7B config, fp16
    python -m avg_edge.export.iotable -m CKPT --precision fp32
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


def main() -> None:
    from avg_edge.model.config import AVG_LLAVA_7B_CONFIG, AvgLlavaConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", type=Path)
    ap.add_argument("--precision", default="fp16")
    a = ap.parse_args()
    config = AvgLlavaConfig.from_folder(a.model) if a.model else AvgLlavaConfig.from_dict(AVG_LLAVA_7B_CONFIG)
    print(tables(config, a.precision))


if __name__ == "__main__":
    main()
