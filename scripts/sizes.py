"""
The largest modules, classes and functions of vaporproxy/ (issue #8's size
rule: modules ~500 lines, classes ~300, functions ~60), from the AST.
"""

import ast
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vaporproxy")


def main(top: int = 10) -> None:
    modules, classes, functions = [], [], []
    for base, _dirs, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(base, name)
            rel = os.path.relpath(path, os.path.dirname(ROOT))
            src = open(path).read()
            modules.append((src.count("\n"), rel))
            for node in ast.walk(ast.parse(src)):
                if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                size = node.end_lineno - node.lineno + 1
                if isinstance(node, ast.ClassDef):
                    classes.append((size, f"{rel}:{node.name}"))
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    functions.append((size, f"{rel}:{node.name}"))
    for title, rows, limit in (("modules", modules, 500), ("classes", classes, 300), ("functions", functions, 60)):
        print(f"{title} (limit ~{limit}):")
        for size, what in sorted(rows, reverse=True)[:top]:
            print(f"  {size:5d} {what}{'  OVER' if size > limit else ''}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
