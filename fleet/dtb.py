"""What the kernel must load before the root file system on an SD card can appear.

A Raspberry Pi's SD slot is a device-tree node (the Pi 4's ``emmc2``, the Pi 3's ``sdhost``)
that names other nodes it needs: supplies (``vmmc-supply``/``vqmmc-supply``: a fixed and a GPIO
regulator on the Pi 4), the GPIO expander those switch through, clocks, pin control, DMA, and
the buses it sits on. Each of those is bound by a driver; a driver built as a module that is not
in the initramfs is never loaded before root is needed, so the SD controller waits for its
supply forever ("waiting for root device"). This module follows the references from the DTB
and maps each node to its driver through the kernel's own module index (modules.alias,
modules.dep), so the image's initramfs list can be checked against the kernel it
ships (tests/fleet/test_initramfs.py, and ``make image`` itself).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import fdt

# properties that hold <phandle specifier...> lists, and the provider's cell-count property
SPECIFIER_LISTS = {"clocks": "#clock-cells", "resets": "#reset-cells",
                   "power-domains": "#power-domain-cells", "dmas": "#dma-cells",
                   "mboxes": "#mbox-cells", "phys": "#phy-cells", "gpios": "#gpio-cells",
                   "gpio": "#gpio-cells", "interrupts-extended": "#interrupt-cells",
                   "iommus": "#iommu-cells"}
SINGLE_PHANDLES = re.compile(r"^(.*-supply|pinctrl-\d+|interrupt-parent|mmc-pwrseq)$")
MMC_HOSTS = ("brcm,bcm2711-emmc2", "brcm,bcm2835-sdhost", "brcm,bcm2835-sdhci",
             "brcm,bcm2835-mmc")


@dataclass
class ModuleIndex:
    """A kernel's loadable drivers: which module binds a compatible string, what it needs.

    A compatible no module claims is bound by a built-in driver (their device tables are not
    indexed) or by none: either way nothing has to be loaded for it."""

    aliases: dict[str, set[str]] = field(default_factory=dict)  # compatible -> modules
    builtin: set[str] = field(default_factory=set)  # modules built into the kernel
    deps: dict[str, set[str]] = field(default_factory=dict)  # module -> modules it needs

    @classmethod
    def load(cls, modules_dir: Path) -> ModuleIndex:
        """From /lib/modules/<version> (depmod's modules.alias and modules.dep)."""
        index = cls()
        for line in (modules_dir / "modules.alias").read_text().splitlines():
            match = re.match(r"^alias of:N\*T\*C(.+?)(C\*)? (\S+)$", line)
            if match:
                index.aliases.setdefault(match.group(1), set()).add(norm(match.group(3)))
        index.builtin = {_module_name(p) for p in
                         (modules_dir / "modules.builtin").read_text().split()}
        for line in (modules_dir / "modules.dep").read_text().splitlines():
            path, _, needs = line.partition(":")
            index.deps[_module_name(path)] = {_module_name(p) for p in needs.split()}
        return index

    def closure(self, modules: set[str]) -> set[str]:
        """``modules`` and everything they need (what initramfs-tools copies for a list)."""
        todo, seen = list(modules), set()
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(self.deps.get(name, ()))
        return seen


def norm(module: str) -> str:
    return module.replace("-", "_")


def _module_name(path: str) -> str:
    return norm(Path(path).name.split(".ko")[0])


@dataclass(frozen=True)
class Need:
    node: str  # the supplier's path in the device tree
    compatible: str
    modules: frozenset[str]  # any of them binds it
    via: str  # how the SD node reaches it


class Tree:
    def __init__(self, blob: bytes) -> None:
        self.dt = fdt.parse_dtb(blob)
        self.by_phandle: dict[int, fdt.Node] = {}
        for path, nodes, _props in self.dt.walk():
            for node in nodes:
                self._index(node)
            if path == "/":
                self._index(self.dt.root)

    def _index(self, node: fdt.Node) -> None:
        for name in ("phandle", "linux,phandle"):
            prop = node.get_property(name)
            if prop is not None:
                self.by_phandle[int(prop.data[0])] = node

    def nodes(self) -> list[fdt.Node]:
        found = [self.dt.root]
        for _path, nodes, _props in self.dt.walk():
            found.extend(nodes)
        return found

    @staticmethod
    def path(node: fdt.Node) -> str:
        return f"{node.path.rstrip('/')}/{node.name}" if node.name != "/" else "/"

    @staticmethod
    def strings(node: fdt.Node, name: str) -> list[str]:
        prop = node.get_property(name)
        return list(prop.data) if prop is not None and hasattr(prop, "data") else []

    def enabled(self, node: fdt.Node) -> bool:
        return self.strings(node, "status") in ([], ["okay"], ["ok"])

    def references(self, node: fdt.Node) -> list[tuple[str, fdt.Node]]:
        """The nodes ``node`` points at, with the property that does."""
        refs: list[tuple[str, fdt.Node]] = []
        for prop in node.props:
            words = [int(w) for w in getattr(prop, "data", [])
                     if isinstance(w, int)] if type(prop).__name__ == "PropWords" else []
            if not words:
                continue
            if SINGLE_PHANDLES.match(prop.name):
                refs += [(prop.name, self.by_phandle[w]) for w in words if w in self.by_phandle]
            elif prop.name in SPECIFIER_LISTS or prop.name.endswith("-gpios"):
                cells = SPECIFIER_LISTS.get(prop.name, "#gpio-cells")
                i = 0
                while i < len(words):
                    provider = self.by_phandle.get(words[i])
                    if provider is None:
                        break
                    refs.append((prop.name, provider))
                    count = provider.get_property(cells)
                    i += 1 + (int(count.data[0]) if count is not None else 0)
        return refs

    def ancestors(self, node: fdt.Node) -> list[fdt.Node]:
        found = []
        parent = node.parent
        while parent is not None and parent.name != "/":
            found.append(parent)
            parent = parent.parent
        return found

    def sd_card_nodes(self) -> list[fdt.Node]:
        """Enabled MMC hosts with a removable card (the SDIO Wi-Fi host is non-removable)."""
        return [n for n in self.nodes()
                if any(c in MMC_HOSTS for c in self.strings(n, "compatible"))
                and self.enabled(n) and n.get_property("non-removable") is None]

    def suppliers(self, start: fdt.Node) -> list[tuple[fdt.Node, str]]:
        """Every node ``start`` depends on (references, recursively, and the buses above)."""
        seen: dict[str, tuple[fdt.Node, str]] = {}
        todo: list[tuple[fdt.Node, str]] = [(start, "the SD controller")]
        while todo:
            node, via = todo.pop()
            key = self.path(node)
            if key in seen:
                continue
            seen[key] = (node, via)
            for parent in self.ancestors(node):
                todo.append((parent, f"{via} > parent {self.path(parent)}"))
            for prop, target in self.references(node):
                todo.append((target, f"{via} > {prop} {self.path(target)}"))
        return list(seen.values())


def needs(blob: bytes, index: ModuleIndex) -> list[Need]:
    """The loadable modules the SD card nodes of a DTB need."""
    tree = Tree(blob)
    found: dict[str, Need] = {}
    for sd in tree.sd_card_nodes():
        for node, via in tree.suppliers(sd):
            for compatible in tree.strings(node, "compatible"):  # most specific first
                modules = index.aliases.get(compatible)
                if modules:
                    found.setdefault(tree.path(node), Need(
                        tree.path(node), compatible, frozenset(modules), via))
                    break
    return list(found.values())


def read_module_list(path: Path) -> set[str]:
    """initramfs-tools' modules file: one module a line, ``#`` comments."""
    names = set()
    for line in path.read_text().splitlines():
        word = line.split("#", 1)[0].strip().split()
        if word:
            names.add(norm(word[0]))
    return names


def missing(blob: bytes, index: ModuleIndex, listed: set[str]) -> list[Need]:
    """The needs of a DTB that an initramfs with the modules ``listed`` does not meet."""
    present = index.closure({norm(m) for m in listed})
    return [n for n in needs(blob, index) if not (n.modules & present)]
