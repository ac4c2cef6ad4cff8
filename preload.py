"""stable-diffusion-webui reads this before parsing its command line: the RealSR model folder flag."""


def preload(parser) -> None:  # noqa: ANN001 - the webui's argparse parser
    parser.add_argument("--realsr-models-path", type=str, default=None,
                        help="folder of RealSR model files (FeMaSR, MM-RealSR, CRL-SR, StableSR modules, CFW VAEs); "
                        "default: models/RealSR")
