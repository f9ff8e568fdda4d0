"""``python -m fcas <job> key=value ...``: the ``fcas`` console command (:mod:`fcas.pipeline.commands`)."""
from fcas.pipeline.commands import main

if __name__ == "__main__":
    main()
