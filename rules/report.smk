# Rules of the report stage: paper-style tables, figures and the reproduced-vs-published page
# (`mambapath report`) from everything the evaluate stage wrote. PNG figures, CSV tables and
# the HTML page are flagged for `snakemake --report report.html`; the files the rule writes
# are listed by mambapath.report.expected_outputs, and rule all asks for all of them.

from mambapath.report import expected_outputs

REPORT_FILES = expected_outputs(
    f"{RESULTS}/report",
    [COHORT.name],
    {task: config["tasks"][task]["type"] for task in COHORT.tasks},
    config["methods"],
)
REPORT_OUTPUTS = [path for paths in REPORT_FILES.values() for path in paths]


rule report:
    input:
        summaries=expand(f"{EVAL_DIR}/{{task}}/{{method}}/summary.json", task=COHORT.tasks, method=config["methods"]),
        folds=expand(f"{EVAL_DIR}/{{task}}/{{method}}/folds.csv", task=COHORT.tasks, method=config["methods"]),
        oof=expand(f"{EVAL_DIR}/{{task}}/{{method}}/oof.csv", task=COHORT.tasks, method=config["methods"]),
        comparisons=expand(f"{EVAL_DIR}/{{task}}/comparisons.csv", task=COHORT.tasks),
    output:
        page=[report(p, caption="../report/page.rst", category="Report page") for p in REPORT_FILES["page_html"]],
        page_md=REPORT_FILES["page_md"],
        tables=[report(p, caption="../report/tables.rst", category="Tables") for p in REPORT_FILES["tables_csv"]],
        tables_text=REPORT_FILES["tables_text"],
        figures=[report(p, caption="../report/figures.rst", category="Figures") for p in REPORT_FILES["figures_png"]],
        figures_pdf=REPORT_FILES["figures_pdf"],
    log:
        f"{RESULTS}/logs/report/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/report.tsv"
    params:
        # results/<cohort>/eval from .../eval/<task>/comparisons.csv; the report folder from its page
        eval_dir=lambda wildcards, input: os.path.dirname(os.path.dirname(input.comparisons[0])),
        out_dir=lambda wildcards, output: os.path.dirname(output.page[0]),
        cohort=COHORT.name,
        tasks=COHORT.tasks,
        methods=config["methods"],
        extractor=EXTRACTOR,
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    conda:
        "../envs/cpu.yaml"
    shell:
        "mambapath report --eval {params.cohort}={params.eval_dir:q} --out-dir {params.out_dir:q}"
        " --tasks {params.tasks} --methods {params.methods} --extractor {params.extractor}"
        " > {log} 2>&1"
