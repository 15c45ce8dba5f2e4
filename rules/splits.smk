# Rules of the splits stage.
