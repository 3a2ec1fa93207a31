import PEADiffusion

func runBench(_ arguments: [String]) throws {
    throw PEAError.usage("bench: not built yet")
}
