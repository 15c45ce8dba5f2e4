# Rules of the download stage: one job per slide of a `source: gdc` cohort, fetched by UUID
# from the GDC data endpoint with Range resume and md5 verification (`mambapath download`).
# Each job holds one `gdc_connections`: `snakemake --resources gdc_connections=4` keeps at most
# four transfers running. The slide lands where slide_path() (rules/common.smk) points.

DOWNLOAD = config["download"]


if COHORT.source == "gdc":
    # megabytes per slide from the cohort table, for each job's runtime (a SLURM time limit)
    SLIDE_MB = (
        pd.read_csv(cohort_sheet_path(), usecols=["slide_id", "size"]).set_index("slide_id")["size"] / 1e6
    ).to_dict()
    DOWNLOADED_SLIDE = f"{downloaded_slides_dir()}/{{slide}}.svs"

    rule download:
        output:
            # keep_slides false: Snakemake deletes the slide once every job reading it has finished
            slide=DOWNLOADED_SLIDE if DOWNLOAD["keep_slides"] else temp(DOWNLOADED_SLIDE),
        log:
            f"{RESULTS}/logs/download/{{slide}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/download/{{slide}}.tsv"
        params:
            manifest=cohort_sheet_path(),
            gdc_url=DOWNLOAD["gdc_url"],
            token_file=DOWNLOAD.get("token_file") or "",
            retries=DOWNLOAD["retries"],
            verify_tries=DOWNLOAD["verify_tries"],
            min_free_gb=DOWNLOAD["min_free_gb"],
        # compute nodes often have no internet: by default downloads run where snakemake runs
        localrule: DOWNLOAD.get("local", True)
        threads: 1
        resources:
            mem_mb=1000,
            # minutes at download.assumed_mb_per_s, plus ten for start-up and the md5 check
            runtime=lambda wildcards: 10 + int(SLIDE_MB.get(wildcards.slide, 0) / DOWNLOAD["assumed_mb_per_s"] / 60),
            gdc_connections=1,
        conda:
            "../envs/cpu.yaml"
        shell:
            "mambapath download --manifest {params.manifest:q} --slides {wildcards.slide:q} --out {output.slide:q}"
            " --base-url {params.gdc_url:q} --token-file={params.token_file:q} --retries {params.retries}"
            " --verify-tries {params.verify_tries} --min-free-gb {params.min_free_gb} --max-connections 1"
            " > {log} 2>&1"
