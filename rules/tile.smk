# Rules of the tile stage.
