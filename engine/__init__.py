"""The pipeline's machinery. You run the scripts at the repository's root and edit the files
there (models/, configs/, layers.py, loss.py, dataset_functions.py, ...); this package is what
they stand on, and a fork rarely needs to open it.

What your own files may import from here (the rest may change under a fork's feet):

    from engine.model_base import PyNet    # the base class of a model flow (models/<name>/<name>.py)
    from engine.errors import UserError    # raise it from a dataset function, a loss or a flow:
                                           # the script stops with `error: <your message>`, exit 2

Modules, lowest first; each imports only modules above it in this list (tests/test_imports.py
checks it):

    errors         one exception for the user's mistakes, and how a script reports them
    files          files written whole or not at all (checkpoints, tables, pictures)
    registry       every name a config or architecture may use -> its class or function
    cli            what the four scripts share on their command lines
    config         the run configs: defaults, --set, validation, the reference in docs/config.md
    dashboard      TensorBoard (or PNGs) while a run trains
    architecture   an architecture YAML read into a checked plan
    model_base     PyNet: that plan built into modules, the flow's base class
    metrics        outputs against targets: accuracy, PSNR, SSIM
    runs           a run's folder: checkpoints, metrics.jsonl, run.json; finding and loading them
    sweep          a grid or draws of runs, trained one or several at a time, and their ranked table
    sample_metrics FID, KID, precision/recall of generated samples
    network        one trained network: its optimizer, schedule, precision, EMA, checkpoint entry
    placement      where a process trains (device, DDP rank), its threads and random numbers
    logbook        the steps' losses into metrics.jsonl and the progress bar; the non-finite stop
    cuda_graphs    the step as a CUDA graph (training.cuda_graphs)
    step           a step's math (the flow's losses, or the built-in GAN/supervised step) and its updates
    preflight      one trial step before anything is written
    sampling       the model's outputs outside training: the dashboard's picture, sample metrics' samples
    validation     held-out samples measured at each epoch's end
    resume         what a checkpoint holds beyond the weights, and going on from it
    loop           the training loop: epochs, an epoch's end, stopping
"""
