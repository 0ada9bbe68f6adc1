"""Maps the repository's top-level folders into the `specformer` namespace.

Package discovery lives here rather than in pyproject.toml so that a newly generated architecture under
`generated/` is installed without editing any packaging file.
"""

from setuptools import find_packages, setup

FOLDERS = {
    "dsl": "dsl",
    "codegen": "codegen",
    "runtime": "runtime",
    "generated": "generated",
    "specs": "specs",
}

# `specformer` itself: the public names, imported lazily (api/__init__.py)
packages: list[str] = ["specformer"]
package_dir: dict[str, str] = {"specformer": "api"}
for name, folder in FOLDERS.items():
    root = f"specformer.{name}"
    packages.append(root)
    package_dir[root] = folder
    for sub in find_packages(folder):
        packages.append(f"{root}.{sub}")
        package_dir[f"{root}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(packages=packages, package_dir=package_dir)
