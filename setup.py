from setuptools import find_packages, setup

setup(
    name="revcol",
    version="0.1.0",
    description="Reversible Column Networks (Cai et al., ICLR 2023): a reversible column core, "
                "a fairseq RevCol-Transformer plugin and timm RevCol-ViT models",
    packages=find_packages(include=["revcol", "revcol_fairseq", "revcol_vit"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.7"],  # torch._dynamo.config.recompile_limit (compile_levels)
    extras_require={
        "vit": ["timm", "torchvision", "pyyaml", "tensorboard", "matplotlib", "tqdm"],
        "fairseq": [
            "fairseq==0.12.2; python_version < '3.11'",
            "fairseq-fixed==0.12.3.1; python_version >= '3.11'",
            "sentencepiece",
            "subword-nmt",
            "sacrebleu",
            "sacremoses",
        ],
        "dev": ["pytest", "ruff", "scikit-learn", "onnx", "onnxscript", "onnxruntime"],  # onnx*: the ONNX export tests
    },
    entry_points={"console_scripts": [
        "revcol-vit-train=revcol_vit.train:main",
        "revcol-vit-validate=revcol_vit.validate:main",
        "revcol-vit-sweep=revcol_vit.sweep:main",
    ]},
)
