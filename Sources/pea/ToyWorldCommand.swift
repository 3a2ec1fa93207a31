import PEADiffusion

let toyWorldUsage = """
Usage: pea toyworld corpus --output DIR [--per-class N] [--seed S]
       pea toyworld classify IMAGE.png [IMAGE.png …] [--json]
       pea toyworld grid --columns N --output OUT.png IMAGE.png [IMAGE.png …]
       pea toyworld draw --colour C --shape S --output OUT.png [--x0 X --y0 Y --side SIDE]

The toy world (tools/toyworld/world.py): 64×64 images of one coloured shape on white, 6 colours (red green blue
yellow purple orange) × 4 shapes (circle square triangle cross), English and Chinese captions. Red cross, green
triangle, blue circle and yellow square are held out of the Chinese training data.

  corpus     a Chinese training corpus of the 20 other classes: DIR/images/NNNNN.png and DIR/train.jsonl, one
             {"image", "text" (Chinese), "text_en" (English)} line per image, what 'pea train --data' reads.
             --per-class N images per class (default 80), random boxes and caption templates from --seed S
             (default 0); the same seed writes the same bytes. Prints the manifest's path.
  classify   names the colour and shape in each image (a fixed classifier: ink threshold, largest component,
             nearest palette colour, best-fitting ideal shape): one line per image, PATH<TAB>colour<TAB>shape,
             or PATH<TAB>none when no object is found; with --json one object per line
             {"colour": …, "path": …, "shape": …} (null colour and shape when none is found).
  grid       tiles same-size images row-major, --columns per row, with a 2-pixel white gutter, into one PNG.
  draw       one drawing of the world; the box (pixels, y down) defaults to a centred one of side 32.
"""

func runToyWorld(_ arguments: [String]) throws {
    guard let subcommand = arguments.first else {
        print(toyWorldUsage)
        throw PEAError.usage("toyworld: no subcommand given (corpus, classify, grid or draw)")
    }
    let rest = Array(arguments.dropFirst())
    if ["--help", "-h", "help"].contains(subcommand) || rest.contains("--help") || rest.contains("-h") {
        print(toyWorldUsage)
        return
    }
    switch subcommand {
    case "corpus": try runToyWorldCorpus(rest)
    case "classify": try runToyWorldClassify(rest)
    case "grid": try runToyWorldGrid(rest)
    case "draw": try runToyWorldDraw(rest)
    default:
        throw PEAError.usage("toyworld: unknown subcommand '\(subcommand)' (corpus, classify, grid or draw; see 'pea toyworld --help')")
    }
}

/// Splits positional arguments (those not starting with "--" and not an option's value) from options.
private func splitPositionals(_ arguments: [String], valueOptions: Set<String>) -> (positionals: [String], options: [String]) {
    var positionals: [String] = [], options: [String] = []
    var index = 0
    while index < arguments.count {
        let argument = arguments[index]
        if argument.hasPrefix("-") && argument != "-" {
            options.append(argument)
            if valueOptions.contains(argument), index + 1 < arguments.count {
                index += 1
                options.append(arguments[index])
            }
        } else {
            positionals.append(argument)
        }
        index += 1
    }
    return (positionals, options)
}

private func runToyWorldCorpus(_ arguments: [String]) throws {
    let command = "toyworld corpus"
    let options = try Arguments(arguments, command: command,
                                spec: ["--output": .value, "--per-class": .value, "--seed": .value])
    let output = try options.requiredString("--output")
    let perClass = try options.int("--per-class", default: 80, range: 1...1_000_000)
    let seedText = options.string("--seed") ?? "0"
    guard let seed = UInt64(seedText) else {
        throw PEAError.usage("\(command): option '--seed' expects a non-negative integer, got '\(seedText)'")
    }
    print(try ToyWorld.writeCorpus(to: output, perClass: perClass, seed: seed))
}

private func runToyWorldClassify(_ arguments: [String]) throws {
    let command = "toyworld classify"
    let (paths, flags) = splitPositionals(arguments, valueOptions: [])
    let options = try Arguments(flags, command: command, spec: ["--json": .flag])
    guard !paths.isEmpty else { throw PEAError.usage("\(command): no images given") }
    for path in paths {
        let image = try PNGDecoder.decode(path: path).rgb()
        let result = ToyWorldClassifier.classify(image)
        if options.has("--json") {
            let object: [String: JSONValue] = ["path": .string(path),
                                               "colour": result.map { .string($0.colour.rawValue) } ?? .null,
                                               "shape": result.map { .string($0.shape.rawValue) } ?? .null]
            print(JSONValue.object(object).serialized())
        } else if let result {
            print("\(path)\t\(result.colour.rawValue)\t\(result.shape.rawValue)")
        } else {
            print("\(path)\tnone")
        }
    }
}

private func runToyWorldGrid(_ arguments: [String]) throws {
    let command = "toyworld grid"
    let (paths, flags) = splitPositionals(arguments, valueOptions: ["--columns", "--output"])
    let options = try Arguments(flags, command: command, spec: ["--columns": .value, "--output": .value])
    let output = try options.requiredString("--output")
    guard options.has("--columns") else { throw PEAError.usage("\(command): option '--columns' is required") }
    let columns = try options.int("--columns", default: 1, range: 1...10_000)
    guard !paths.isEmpty else { throw PEAError.usage("\(command): no images given") }
    let images = try paths.map { try PNGDecoder.decode(path: $0).rgb() }
    let grid = try RGBImage.tiled(images, columns: columns, names: paths)
    try PNGWriter.write(rgb: grid.pixels, width: grid.width, height: grid.height, to: output)
    print(output)
}

private func runToyWorldDraw(_ arguments: [String]) throws {
    let command = "toyworld draw"
    let options = try Arguments(arguments, command: command,
                                spec: ["--colour": .value, "--shape": .value, "--output": .value,
                                       "--x0": .value, "--y0": .value, "--side": .value])
    let colourName = try options.requiredString("--colour"), shapeName = try options.requiredString("--shape")
    guard let colour = ToyColour(rawValue: colourName) else {
        throw PEAError.usage("\(command): --colour must be one of \(ToyColour.allCases.map(\.rawValue).joined(separator: ", ")), got '\(colourName)'")
    }
    guard let shape = ToyShape(rawValue: shapeName) else {
        throw PEAError.usage("\(command): --shape must be one of \(ToyShape.allCases.map(\.rawValue).joined(separator: ", ")), got '\(shapeName)'")
    }
    let output = try options.requiredString("--output")
    let side = try options.double("--side") ?? 32
    guard side > 0 else { throw PEAError.usage("\(command): option '--side' must be positive, got \(side)") }
    let x0 = try options.double("--x0") ?? (Double(ToyWorld.size) - side) / 2
    let y0 = try options.double("--y0") ?? (Double(ToyWorld.size) - side) / 2
    let rgb = ToyWorld.draw(colour: colour, shape: shape, x0: x0, y0: y0, side: side)
    try PNGWriter.write(rgb: rgb, width: ToyWorld.size, height: ToyWorld.size, to: output)
    print(output)
}
