import PEADiffusion

func runSelftest(_ arguments: [String]) throws {
    throw PEAError.usage("selftest: not built yet")
}
